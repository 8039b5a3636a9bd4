"""The console's pages, one module per role. Each module defines
`MAIN_PAGE` (its landing page, "/console/<role>/"), `add_routes(router)`
(routes with their full paths) and, if it has more than one page, `NAV`
(the nav links: (label, path) pairs). Templates: templates/<role>/*.html,
extending base.html (blocks `title`, `content`).

Writing a page:
- `@requires(Role.X, step_up=...)` on the handler `(request, user)`; put
  step_up=True on the GET that shows a high-risk form as well as on its POST.
- `views.render("x/y.html", request, {...})`: the templates get `user`,
  `csrf_token()`, the nav; `{% import "macros.html" as m with context %}`
  gives `m.csrf()` and `m.resolve_form(action, back)`.
- `ctx = console_context(request)`; `await ctx.call(ctx.core.<service>.<Rpc>,
  message, user)`; a CoreRefusal not caught shows a Chinese error page.
  `ctx.may_touch_account/card(user, id)` for fleet and family users.
  Reports and long lists read `ctx.reports` only, ≤ views.PAGE_SIZE rows a page.
- every POST handler calls `await audit(request, user, "Action", target_uuid,
  "OK" or the refusal's reason)`; the CSRF check runs before it. An upload:
  `views.read_upload` with the token in the form's action (?csrf_token=).
- scripts: a <script> tag in a template runs (it gets the CSP nonce);
  inline handlers (onclick=...) and scripts arriving in data do not.
- charts: fuelcard_console.charts (SVG, Chinese labels), `{{ svg|safe }}`."""

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
