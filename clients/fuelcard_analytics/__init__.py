"""The analytics sidecar (数据分析): follows the server's event stream into a
star-schema warehouse and makes the reports, forecasts and churn warnings.

A separate process that talks to the server only through the generated
client (EventService.StreamEvents)."""
