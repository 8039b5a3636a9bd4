"""The risk officer's pages (console-riskfam builds them: a placeholder meanwhile)."""

from __future__ import annotations

from aiohttp import web

from fuelcard_console.auth import ConsoleUser, Role, requires
from fuelcard_console.views import placeholder

MAIN_PAGE = "/console/risk/"


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, main)


@requires(Role.RISK_OFFICER)
async def main(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return placeholder(request, user, "风控规则")
