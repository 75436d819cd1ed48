"""The loyalty rules, free of host imports so plain CPython can test them:
`python3 -m unittest discover -s tests -t .` in this directory."""


def earned(amount_cents: int, points_per_unit: int) -> int:
    """Points for an order: per whole currency unit, nothing for cents."""
    if amount_cents < 0:
        raise ValueError("negative amount")
    return amount_cents // 100 * points_per_unit


def tier_of(points: int, tiers: dict[str, int]) -> str | None:
    """The highest tier whose threshold `points` reaches, if any."""
    reached = [(threshold, name) for name, threshold in tiers.items() if points >= threshold]
    return max(reached)[1] if reached else None
