"""Model families, one module each; `camcli.models.zoo` imports them on first use."""
