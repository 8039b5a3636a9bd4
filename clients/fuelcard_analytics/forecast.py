"""Demand forecast (需求预测): the next 30 days' daily volume per station and
product, from a time-series decomposition.

Each product's network total is decomposed multiplicatively,
log E[litres] = level + trend * t + weekday effect + holiday effects,
fitted as a Poisson-type regression (numpy only); each station's series is
its recent share of that (top-down: one station's few sales a day are too
noisy to estimate holiday effects from, the network's are not).
The holiday effects are the first day of a holiday period, the rest of it,
the eve (the travel rush) and the Spring Festival (when people stay home);
the calendar is fuelcard_analytics.calendar, the same for history and
future.

Back-test: rolling origin. For each of the last FOLDS 30-day windows, fit on
everything before it and forecast it; MAPE is the mean of |actual -
forecast| / actual over the days with sales, at three levels: each station
and product (what is asked), each station, and the whole network.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuelcard_analytics.calendar import eve, holiday
from fuelcard_analytics.reports import (
    Output,
    TooLittleHistory,
    _plt,
    _save,
    day_of,
    write_csv,
)
from fuelcard_analytics.warehouse import PRODUCTS, Store

HORIZON_DAYS = 30
FOLDS = 3
RIDGE = 1.0
IRLS_ITERATIONS = 25
MIN_TRAIN_DAYS = 56
SHARE_DAYS = 56

SERIES_SQL = ("SELECT date_key, station_id, product, sum(volume_ml) FROM fact_sale"
              " GROUP BY date_key, station_id, product")


def design(days: list[dt.date], origin: dt.date) -> np.ndarray:
    """The regressors of each day: level, trend (years), weekday (Mon = base),
    holiday first day, holiday, eve, Spring Festival."""
    rows = []
    for d in days:
        name = holiday(d)
        first = bool(name) and not holiday(d - dt.timedelta(days=1))
        weekday = [1.0 if d.weekday() == k else 0.0 for k in range(1, 7)]
        rows.append([1.0, (d - origin).days / 365.0, *weekday, float(first),
                     float(bool(name) and not first), float(eve(d)),
                     float(name == "Spring Festival")])
    return np.array(rows)


def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log E[litres] = x . beta, fitted as a (quasi-)Poisson regression by
    iteratively reweighted least squares with a small ridge (the level is
    not penalised). Fitting the mean, not the mean of the log, keeps sparse
    series (many days without a sale) unbiased."""
    penalty = RIDGE * np.eye(x.shape[1])
    penalty[0, 0] = 0.0
    beta = np.zeros(x.shape[1])
    beta[0] = np.log(max(float(y.mean()), 1e-3))
    for _ in range(IRLS_ITERATIONS):
        eta = np.clip(x @ beta, -20, 20)
        mu = np.exp(eta)
        z = eta + (y - mu) / mu
        xw = x * mu[:, None]
        new: np.ndarray = np.linalg.solve(xw.T @ x + penalty, xw.T @ z)
        if np.max(np.abs(new - beta)) < 1e-6:
            return new
        beta = new
    return beta


def predict(x: np.ndarray, beta: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(np.clip(x @ beta, -20, 20))
    return out


@dataclass
class Series:
    start: dt.date
    keys: list[tuple[str, int]]   # (station, product)
    litres: np.ndarray            # series x days

    @property
    def days(self) -> list[dt.date]:
        return [self.start + dt.timedelta(days=i) for i in range(self.litres.shape[1])]


def load(store: Store) -> Series | None:
    rows = store.query(SERIES_SQL)
    if not rows:
        return None
    first = day_of(min(r[0] for r in rows))
    last = day_of(max(r[0] for r in rows))
    keys = sorted({(r[1], int(r[2])) for r in rows})
    index = {k: i for i, k in enumerate(keys)}
    litres = np.zeros((len(keys), (last - first).days + 1))
    for key, station, product, volume in rows:
        litres[index[(station, int(product))], (day_of(key) - first).days] = int(volume) / 1000
    return Series(first, keys, litres)


def forecast_matrix(s: Series, train_days: int, horizon: int) -> np.ndarray:
    """Forecast `horizon` days after the first train_days, top-down: the
    decomposition is fitted to each product's network total (where weekday
    and holiday effects stand out of the noise), and each station gets its
    share of that product over the last SHARE_DAYS."""
    days = s.days
    future = [days[0] + dt.timedelta(days=train_days + i) for i in range(horizon)]
    x_train, x_future = design(days[:train_days], days[0]), design(future, days[0])
    out = np.zeros((len(s.keys), horizon))
    products = sorted({p for _, p in s.keys})
    recent = s.litres[:, max(0, train_days - SHARE_DAYS):train_days].sum(axis=1)
    for product in products:
        rows = [i for i, (_, p) in enumerate(s.keys) if p == product]
        total = s.litres[rows, :train_days].sum(axis=0)
        path = predict(x_future, fit(x_train, total))
        recent_total = float(recent[rows].sum())
        for i in rows:
            share = float(recent[i]) / recent_total if recent_total > 0 else 1 / len(rows)
            out[i] = share * path
    return out


def mape(actual: np.ndarray, forecast: np.ndarray) -> float:
    mask = actual > 0
    return float(np.mean(np.abs(actual[mask] - forecast[mask]) / actual[mask]) * 100)


def wape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Volume-weighted: sum |error| / sum actual (small days weigh less)."""
    return float(np.abs(actual - forecast).sum() / max(float(actual.sum()), 1e-9) * 100)


@dataclass(frozen=True)
class Backtest:
    folds: int
    mape_station_product: float
    mape_station: float
    mape_network: float
    wape_station_product: float
    wape_station: float
    # the same windows forecast naively (each series' mean of its last 28
    # days, flat): what the decomposition must beat
    naive_mape_station_product: float
    naive_mape_network: float

    def text(self) -> str:
        return (f"back-tested MAPE over {self.folds} x {HORIZON_DAYS}-day windows:"
                f" station x product {self.mape_station_product:.1f} %"
                f" (accuracy {100 - self.mape_station_product:.1f} %),"
                f" station {self.mape_station:.1f} % ({100 - self.mape_station:.1f} %),"
                f" network {self.mape_network:.1f} % ({100 - self.mape_network:.1f} %);"
                f" volume-weighted (WAPE): station x product {self.wape_station_product:.1f} %,"
                f" station {self.wape_station:.1f} %; a flat 28-day mean scores"
                f" {self.naive_mape_station_product:.1f} % / {self.naive_mape_network:.1f} %")


def backtest(s: Series, folds: int = FOLDS) -> tuple[Backtest, list[tuple[int, np.ndarray]]]:
    n_days = s.litres.shape[1]
    folds = min(folds, max(0, (n_days - MIN_TRAIN_DAYS) // HORIZON_DAYS))
    if folds == 0:
        raise TooLittleHistory("forecast", MIN_TRAIN_DAYS + HORIZON_DAYS, n_days)
    stations = sorted({k[0] for k in s.keys})
    member = np.array([[1.0 if k[0] == st else 0.0 for k in s.keys] for st in stations])
    actual_sp, fc_sp, actual_st, fc_st, actual_net, fc_net = [], [], [], [], [], []
    naive_sp, naive_net = [], []
    predictions = []
    for f in range(folds, 0, -1):
        train = n_days - f * HORIZON_DAYS
        fc = forecast_matrix(s, train, HORIZON_DAYS)
        act = s.litres[:, train:train + HORIZON_DAYS]
        predictions.append((train, fc))
        flat = np.repeat(s.litres[:, train - 28:train].mean(axis=1, keepdims=True),
                         HORIZON_DAYS, axis=1)
        naive_sp.append(flat)
        naive_net.append(flat.sum(axis=0))
        actual_sp.append(act)
        fc_sp.append(fc)
        actual_st.append(member @ act)
        fc_st.append(member @ fc)
        actual_net.append(act.sum(axis=0))
        fc_net.append(fc.sum(axis=0))
    a_sp, f_sp = np.concatenate(actual_sp, axis=1), np.concatenate(fc_sp, axis=1)
    a_st, f_st = np.concatenate(actual_st, axis=1), np.concatenate(fc_st, axis=1)
    result = Backtest(folds, mape(a_sp, f_sp), mape(a_st, f_st),
                      mape(np.concatenate(actual_net), np.concatenate(fc_net)),
                      wape(a_sp, f_sp), wape(a_st, f_st),
                      mape(a_sp, np.concatenate(naive_sp, axis=1)),
                      mape(np.concatenate(actual_net), np.concatenate(naive_net)))
    return result, predictions


def run(store: Store, out: Path) -> tuple[Output, Backtest]:
    s = load(store)
    if s is None:
        raise TooLittleHistory("forecast", MIN_TRAIN_DAYS + HORIZON_DAYS, 0)
    result, predictions = backtest(s)
    n_days = s.litres.shape[1]
    ahead = forecast_matrix(s, n_days, HORIZON_DAYS)
    last = s.days[-1]
    table = []
    for i, (station, product) in enumerate(s.keys):
        for h in range(HORIZON_DAYS):
            table.append([(last + dt.timedelta(days=h + 1)).isoformat(), station,
                          PRODUCTS.get(product, (str(product),))[0], round(float(ahead[i, h]), 1)])
    path = write_csv(out / "forecast.csv", ["day", "station_id", "product", "litres"], table)
    write_csv(out / "forecast_backtest.csv", ["level", "mape_pct", "accuracy_pct"], [
        ["station_product", round(result.mape_station_product, 2),
         round(100 - result.mape_station_product, 2)],
        ["station", round(result.mape_station, 2), round(100 - result.mape_station, 2)],
        ["network", round(result.mape_network, 2), round(100 - result.mape_network, 2)],
        ["station_product_wape", round(result.wape_station_product, 2),
         round(100 - result.wape_station_product, 2)],
        ["station_wape", round(result.wape_station, 2), round(100 - result.wape_station, 2)]])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4))
    shown = min(n_days, 150)
    history = s.days[-shown:]
    ax.plot(history, s.litres.sum(axis=0)[-shown:], color="#444444", linewidth=0.9,
            label="actual (network)")
    for k, (train, fc) in enumerate(predictions):
        window = s.days[train:train + HORIZON_DAYS]
        ax.plot(window, fc.sum(axis=0), color="#ff7f0e", linewidth=1.2,
                label="back-test forecast" if k == 0 else None)
    future = [last + dt.timedelta(days=h + 1) for h in range(HORIZON_DAYS)]
    ax.plot(future, ahead.sum(axis=0), color="#d62728", linewidth=1.6, label="next 30 days")
    ax.set_ylabel("litres per day")
    ax.set_title(f"Demand forecast (network total of {len(s.keys)} station x product series);"
                 f" MAPE {result.mape_station_product:.1f} % per series,"
                 f" {result.mape_network:.1f} % network")
    ax.legend(fontsize=8)
    png = _save(fig, out / "forecast.png")
    by_station: dict[str, float] = defaultdict(float)
    for i, (station, _) in enumerate(s.keys):
        by_station[station] += float(ahead[i].sum())
    return Output("forecast", path, png, result.text()), result
