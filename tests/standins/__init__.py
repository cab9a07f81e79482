"""Small HTTPS stand-ins of Azure services that cannot run locally, spoken to through the real SDKs."""
