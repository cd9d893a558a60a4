"""The pillars as tasks for the one train loop (config sections, building, init, loss).

The name -> task registry lives in the app layer (`jaxgen.app`); nothing below the tasks knows
them."""
