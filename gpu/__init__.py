"""modelconsole.gpu: what the hardware says and allows (NVML readings, budgets, the simulated device).

Device selection lives in ``modelconsole.scheduler.instance.resolve_device``
until the budget and placement work lands here.
"""
