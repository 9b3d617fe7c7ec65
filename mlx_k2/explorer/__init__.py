"""The explorer: one self-contained HTML page of a ledger or bundle."""
