"""What the tests share that is not a pytest plugin: builders of cards and
controls, ledger and warehouse assertions, channel simulators, race and
row-lock helpers, and the report-flood process of test_overload.py."""
