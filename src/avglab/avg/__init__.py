"""AVG-LLaVA (METHOD 1): the granularity router, RGLF's losses and stage 4's feedback cache."""
