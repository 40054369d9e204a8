from avglab.cli import main

main()
