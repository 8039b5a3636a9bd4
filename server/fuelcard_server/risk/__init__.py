"""The real-time risk engine: rule model (model.py), Python evaluator
(engine.py), backtests (backtest.py) and metrics (metrics.py). Live scoring
happens in the database, inside fc.authorize (sql/functions/risk.sql)."""
