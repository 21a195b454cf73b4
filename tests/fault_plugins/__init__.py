"""Third-party plugins with the faults of issue 20's table, one distribution each (tests/test_faults.py).

Each module is what a plugin author could plausibly write; the tests load them beside the
built-ins and the example plugin and assert the one clear error (or documented behaviour) each gets.
"""
