"""Payment channel adapters: bank card, WeChat Pay, Alipay and e-CNY
notifications into the core's signed Recharge / RefundRecharge, and each
channel's daily settlement file into the neutral settlement format."""
