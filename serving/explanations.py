"""The explanation outputs of the ranking and recommender signatures (trainer/explain.py), read and
rendered for people: "because you clicked ad_7 (+0.42); moved most by history +0.51, user -0.20".

Weights and contributions are in units of the CTR logit: +0.42 means the ad's logit would be 0.42
lower without that history ad. Needs numpy only.
"""

from __future__ import annotations

import numpy as np

from serving.contract import BECAUSE_AD_IDS, BECAUSE_WEIGHTS, EXPLANATION_GROUPS, GROUP_CONTRIBUTIONS, PAD_AD_ID


def read(out: dict[str, np.ndarray], b: int, r: int) -> tuple[tuple[tuple[str, float], ...], dict[str, float]]:
    """Request b's ad r's explanation from a recommender response: ((history ad id, weight), ...) best
    first, padding left out, and {group: contribution}. Empty for a model exported without them."""
    because: tuple[tuple[str, float], ...] = ()
    if BECAUSE_AD_IDS in out and BECAUSE_WEIGHTS in out:
        ids, weights = out[BECAUSE_AD_IDS][b][r], out[BECAUSE_WEIGHTS][b][r]
        because = tuple((_text(i), float(w)) for i, w in zip(ids, weights, strict=True)
                        if _text(i) != PAD_AD_ID)
    groups: dict[str, float] = {}
    if GROUP_CONTRIBUTIONS in out:
        values = out[GROUP_CONTRIBUTIONS][b][r]
        names = EXPLANATION_GROUPS if len(values) == len(EXPLANATION_GROUPS) else \
            tuple(f"group_{i}" for i in range(len(values)))  # a newer contract: keep the numbers
        groups = {n: float(v) for n, v in zip(names, values, strict=True)}
    return because, groups


def render(because, groups: dict[str, float], top_groups: int = 2) -> str:
    """One line: the history ads that raised the score (positive weights only), then the `top_groups`
    groups that moved it most either way; "" when there is nothing to say."""
    clauses = []
    raised = [f"{ad} ({w:+.2f})" for ad, w in because if w > 0]
    if raised:
        clauses.append("because you clicked " + ", ".join(raised))
    moved = sorted(((g, v) for g, v in groups.items() if v != 0.0), key=lambda gv: -abs(gv[1]))[:top_groups]
    if moved:
        clauses.append("moved most by " + ", ".join(f"{g} {v:+.2f}" for g, v in moved))
    return "; ".join(clauses)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
