"""Commands around the toolkit: export, report, memory, and the speed benchmark (``stage=bench``)."""
