"""The console's pages, one module per role. Each module defines
`MAIN_PAGE` (its landing page, "/console/<role>/"), `add_routes(router)`
(routes with their full paths) and, if it has more than one page, `NAV`
(the nav links: (label, path) pairs). Templates: templates/<role>/*.html,
extending base.html."""

from __future__ import annotations

from types import ModuleType

from fuelcard_console.auth import Role
from fuelcard_console.pages import family, finance, fleet, reviewer, risk, sre

MODULES: tuple[ModuleType, ...] = (fleet, family, reviewer, finance, risk, sre)

ROLE_MODULES: dict[Role, ModuleType] = {
    Role.FLEET_MANAGER: fleet,
    Role.HOLDER: family,
    Role.REVIEWER: reviewer,
    Role.FINANCE: finance,
    Role.RISK_OFFICER: risk,
    Role.SRE: sre,
}
