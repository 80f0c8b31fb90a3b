"""A deterministic synthetic ad world with a known ground-truth click model.

Users have latent topic interests correlated with their demographics; each ad belongs
to one topic and its title/description are written from that topic's words, so the
text carries the signal a cold-start model needs. Impressions are drawn by a simple
ad server (half targeted by topic, half exploratory), shown at a position, and clicked
with probability examination(position) * relevance(user, ad, context). Conversions
follow clicks. A share of ads launch only in the last days, so they never appear in
the training split: those are the cold-start ads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, model_validator

from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.typed_model import SEED_MAX, TypedModel, cross_field

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    # topic: (nouns, adjectives)
    "running": (["running shoes", "trail sneakers", "marathon socks", "jogging shorts"],
                ["lightweight", "cushioned", "breathable", "fast"]),
    "travel": (["beach holidays", "city breaks", "flight deals", "hotel rooms"],
               ["cheap", "last minute", "all inclusive", "luxury"]),
    "finance": (["savings accounts", "credit cards", "stock trading", "home loans"],
                ["low fee", "high interest", "secure", "instant"]),
    "gaming": (["video games", "gaming laptops", "game consoles", "mechanical keyboards"],
               ["epic", "multiplayer", "next gen", "rgb"]),
    "cooking": (["kitchen knives", "cast iron pans", "recipe boxes", "coffee grinders"],
                ["chef grade", "organic", "handmade", "nonstick"]),
    "pets": (["dog food", "cat toys", "pet insurance", "aquarium filters"],
             ["healthy", "grain free", "playful", "vet approved"]),
    "fashion": (["summer dresses", "leather jackets", "designer handbags", "wool scarves"],
                ["elegant", "trendy", "vintage", "sustainable"]),
    "gardening": (["garden tools", "flower seeds", "lawn mowers", "plant pots"],
                  ["durable", "eco friendly", "seasonal", "compact"]),
    "fitness": (["yoga mats", "dumbbells", "protein powder", "gym memberships"],
                ["strong", "adjustable", "vegan", "premium"]),
    "education": (["online courses", "language lessons", "coding bootcamps", "study guides"],
                  ["certified", "flexible", "beginner friendly", "expert led"]),
    "music": (["electric guitars", "concert tickets", "headphones", "vinyl records"],
              ["live", "wireless", "classic", "studio quality"]),
    "cars": (["electric cars", "car insurance", "winter tyres", "dash cams"],
             ["reliable", "hybrid", "affordable", "sporty"]),
    "beauty": (["face serum", "lipstick", "hair dryers", "perfume"],
               ["radiant", "cruelty free", "long lasting", "natural"]),
    "home": (["sofas", "smart lights", "bed linen", "vacuum cleaners"],
             ["cozy", "modern", "robotic", "minimalist"]),
    "books": (["crime novels", "cookbooks", "audiobooks", "childrens books"],
              ["bestselling", "award winning", "illustrated", "new release"]),
    "outdoor": (["camping tents", "hiking boots", "sleeping bags", "kayaks"],
                ["waterproof", "rugged", "ultralight", "family size"]),
}
DESCRIPTION_TEMPLATES = [
    "Discover {adj} {noun} from {brand}. {adj2} {noun2} with free delivery.",
    "{brand} brings you {adj} {noun} and {noun2}. Limited offer, shop now.",
    "Looking for {noun}? Try {adj} {noun2} by {brand} today.",
    "Save on {adj} {noun} at {brand}. Also {adj2} {noun2}.",
]
BRAND_SYLLABLES = ["zen", "nova", "peak", "blue", "max", "vita", "luna", "terra", "aero", "flex",
                   "prime", "urban", "sol", "core", "echo", "bright"]
AGE_BUCKETS = ["18-24", "25-34", "35-44", "45-54", "55+"]
GENDERS = ["f", "m", "x"]
DEVICES = ["mobile", "desktop", "tablet"]
PLACEMENTS = ["feed", "sidebar", "search", "video"]


class SyntheticConfig(TypedModel):
    model_config = ConfigDict(frozen=True)

    seed: int = Field(7, ge=0, le=SEED_MAX)
    n_users: int = Field(2000, ge=1)
    n_advertisers: int = Field(80, ge=1)
    n_ads: int = Field(800, ge=1)
    n_impressions: int = Field(120_000, ge=1)
    n_days: int = Field(14, ge=1)
    cold_start_share: float = Field(0.1, ge=0, lt=1)
    cold_start_days: int = Field(2, ge=0)
    max_position: int = Field(5, ge=1)
    targeted_share: float = Field(0.5, ge=0, le=1)
    n_regions: int = Field(8, ge=1)
    # Multimodal creatives: each ad gets a creative vector (column `creative`, `creative_dim` floats, an
    # "image embedding") that reveals a latent visual style, independent of its text; users have a taste
    # for styles and `creative_weight` scales that match in the click logit. 0 / 0.0: no vector, no term
    # (drawn from a separate random stream, so the rest of the world is the same either way).
    creative_dim: int = Field(0, ge=0, le=4096)
    creative_weight: float = Field(0.0, ge=0, le=10)
    # > 0: from this day (0-based) on, every user's interests move to other topics (one fixed
    # permutation of the topics for all users): a drift world for continuous training; 0: off
    drift_day: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _a_day_before_cold_start(self) -> SyntheticConfig:
        if self.creative_weight > 0 and not self.creative_dim:
            raise cross_field("creative_weight", f"{self.creative_weight} plants a click signal in the creative "
                              "vector, but creative_dim is 0 (no vector); set creative_dim")
        if self.cold_start_days >= self.n_days:
            raise cross_field("cold_start_days", f"{self.cold_start_days} leaves no day before the cold-start ads "
                              f"launch; expected fewer than n_days ({self.n_days})")
        if self.drift_day >= self.n_days:
            raise cross_field("drift_day", f"{self.drift_day} is not a day of the log; expected fewer than n_days "
                              f"({self.n_days}), or 0 for no drift")
        return self


@dataclass
class SyntheticWorld:
    """Users, the ad catalog and impression logs; logs keep the true click probability."""

    users: pd.DataFrame
    catalog: pd.DataFrame
    logs: pd.DataFrame
    config: SyntheticConfig
    schema: FeatureSchema = DEFAULT_SCHEMA

    @property
    def cold_ad_ids(self) -> set[str]:
        return set(self.catalog.loc[self.catalog["is_cold_start"], "ad_id"])


def _brand(rng: np.random.Generator) -> str:
    a, b = rng.choice(BRAND_SYLLABLES, size=2, replace=False)
    return (a + b).capitalize()


def _make_users(cfg: SyntheticConfig, rng: np.random.Generator, n_topics: int):
    age = rng.integers(0, len(AGE_BUCKETS), cfg.n_users)
    gender = rng.integers(0, len(GENDERS), cfg.n_users)
    region = rng.integers(0, cfg.n_regions, cfg.n_users)
    # Each (age, gender) cell prefers some topics, so demographics carry weak signal.
    cell_prior = rng.dirichlet(np.full(n_topics, 0.5), size=(len(AGE_BUCKETS), len(GENDERS)))
    alpha = 0.15 + 2.0 * cell_prior[age, gender]
    interests = np.stack([rng.dirichlet(a) for a in alpha])
    activity = rng.pareto(1.5, cfg.n_users) + 1.0
    users = pd.DataFrame({
        "user_id": [f"u{i:05d}" for i in range(cfg.n_users)],
        "age_bucket": np.array(AGE_BUCKETS)[age],
        "gender": np.array(GENDERS)[gender],
        "region": [f"r{r}" for r in region],
    })
    return users, interests, activity / activity.sum()


def _make_catalog(cfg: SyntheticConfig, rng: np.random.Generator):
    topic_names = list(TOPICS)
    adv_topic = rng.integers(0, len(topic_names), cfg.n_advertisers)
    adv_brand = [_brand(rng) for _ in range(cfg.n_advertisers)]
    ad_adv = rng.integers(0, cfg.n_advertisers, cfg.n_ads)
    # Most ads follow their advertiser's topic; some advertisers run ads across topics.
    ad_topic = np.where(rng.random(cfg.n_ads) < 0.85, adv_topic[ad_adv],
                        rng.integers(0, len(topic_names), cfg.n_ads))
    campaign = rng.integers(0, 3, cfg.n_ads)
    titles, descriptions = [], []
    for i in range(cfg.n_ads):
        nouns, adjs = TOPICS[topic_names[ad_topic[i]]]
        n1, n2 = rng.choice(nouns, size=2, replace=False)
        a1, a2 = rng.choice(adjs, size=2, replace=False)
        brand = adv_brand[ad_adv[i]]
        titles.append(f"{brand} {a1} {n1}")
        template = DESCRIPTION_TEMPLATES[rng.integers(len(DESCRIPTION_TEMPLATES))]
        descriptions.append(template.format(adj=a1, adj2=a2.capitalize(), noun=n1, noun2=n2,
                                            brand=brand))
    quality = rng.normal(0.0, 0.4, cfg.n_ads)
    cvr_quality = rng.normal(0.0, 0.5, cfg.n_ads)
    n_cold = int(round(cfg.cold_start_share * cfg.n_ads))
    is_cold = np.zeros(cfg.n_ads, dtype=bool)
    is_cold[rng.choice(cfg.n_ads, size=n_cold, replace=False)] = True
    launch_day = np.where(is_cold, cfg.n_days - cfg.cold_start_days, 0)
    catalog = pd.DataFrame({
        "ad_id": [f"ad{i:05d}" for i in range(cfg.n_ads)],
        "advertiser_id": [f"adv{a:04d}" for a in ad_adv],
        "campaign_id": [f"cmp{a:04d}_{c}" for a, c in zip(ad_adv, campaign, strict=True)],
        "category": np.array(topic_names)[ad_topic],
        "title": titles,
        "description": descriptions,
        "bid": np.round(rng.lognormal(0.0, 0.5, cfg.n_ads), 3).astype("float32"),
        "launch_day": launch_day,
        "is_cold_start": is_cold,
    })
    return catalog, ad_topic, quality, cvr_quality


CREATIVE_COLUMN = "creative"
STYLE_DIM = 4  # the latent visual style the creative vector reveals


def _creative(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per ad its creative vector [n_ads, creative_dim], per ad its style, per user its taste), from a
    random stream of their own: a style seen through a fixed random linear map plus noise."""
    rng = np.random.default_rng([cfg.seed, 1])
    style = rng.normal(0.0, 1.0, (cfg.n_ads, STYLE_DIM))
    taste = rng.normal(0.0, 1.0, (cfg.n_users, STYLE_DIM))
    mixing = rng.normal(0.0, 1.0 / np.sqrt(STYLE_DIM), (STYLE_DIM, cfg.creative_dim))
    vectors = style @ mixing + 0.3 * rng.normal(0.0, 1.0, (cfg.n_ads, cfg.creative_dim))
    return vectors.astype(np.float32), style, taste


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _interests_by_day(cfg: SyntheticConfig, interests: np.ndarray, user_idx: np.ndarray,
                      day: np.ndarray) -> np.ndarray:
    """Each impression's user interests: from `drift_day` on, every topic's weight moves to another
    topic (a cyclic shift of a random topic order, so no topic keeps its weight). The permutation has
    its own generator, so a world without drift is the same, bit for bit, as before the knob."""
    rows = interests[user_idx]
    if cfg.drift_day <= 0:
        return rows
    order = np.random.default_rng(cfg.seed + 1).permutation(interests.shape[1])
    moved = np.empty_like(order)
    moved[order] = np.roll(order, 1)  # topic order[i] takes the weight of topic order[i - 1]
    shifted = day >= cfg.drift_day
    rows[shifted] = interests[user_idx[shifted]][:, moved]
    return rows


def generate_world(cfg: SyntheticConfig | None = None) -> SyntheticWorld:
    """Build the world. Same config, same frames, bit for bit."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    n_topics = len(TOPICS)
    users, interests, activity = _make_users(cfg, rng, n_topics)
    catalog, ad_topic, quality, cvr_quality = _make_catalog(cfg, rng)

    n = cfg.n_impressions
    user_idx = rng.choice(cfg.n_users, size=n, p=activity)
    seconds = np.sort(rng.integers(0, cfg.n_days * 86400, n))
    day = seconds // 86400
    hour = (seconds % 86400) // 3600
    weekday = (day + 3) % 7  # the log starts on a Thursday
    device = rng.choice(len(DEVICES), size=n, p=[0.6, 0.3, 0.1])
    placement = rng.integers(0, len(PLACEMENTS), n)
    position = rng.integers(1, cfg.max_position + 1, n)

    # The ad server: a live ad of a topic drawn from the user's interests, or any live ad.
    ads_by_topic_day: dict[tuple[int, bool], np.ndarray] = {}
    for t in range(n_topics):
        for cold_live in (False, True):
            live = catalog["launch_day"].to_numpy() == 0 if not cold_live else np.ones(cfg.n_ads, bool)
            ads_by_topic_day[(t, cold_live)] = np.flatnonzero((ad_topic == t) & live)
    cold_period = day >= cfg.n_days - cfg.cold_start_days
    targeted = rng.random(n) < cfg.targeted_share
    row_interests = _interests_by_day(cfg, interests, user_idx, day)
    cum = row_interests.cumsum(axis=1)
    topic_draw = (rng.random(n)[:, None] > cum).sum(axis=1).clip(max=n_topics - 1)
    ad_idx = np.empty(n, dtype=np.int64)
    live_all = np.flatnonzero(catalog["launch_day"].to_numpy() == 0)
    all_ads = np.arange(cfg.n_ads)
    for i in range(n):
        if targeted[i]:
            pool = ads_by_topic_day[(topic_draw[i], bool(cold_period[i]))]
            if len(pool) == 0:
                pool = all_ads if cold_period[i] else live_all
        else:
            pool = all_ads if cold_period[i] else live_all
        ad_idx[i] = pool[rng.integers(len(pool))]

    affinity = np.log(row_interests[np.arange(n), ad_topic[ad_idx]] * n_topics + 1e-3)
    device_effect = np.array([0.15, -0.1, 0.0])[device]
    placement_effect = np.array([0.1, -0.4, 0.3, 0.0])[placement]
    hour_effect = 0.15 * np.sin(2 * np.pi * (hour - 6) / 24)
    creative_effect = 0.0
    schema = DEFAULT_SCHEMA
    if cfg.creative_dim:
        vectors, style, taste = _creative(cfg)
        catalog[CREATIVE_COLUMN] = list(vectors)
        schema = dataclasses.replace(schema, ad_vector=CREATIVE_COLUMN, ad_vector_dim=cfg.creative_dim)
        # Unit variance before the weight: each of the style's dimensions is N(0, 1) for ads and users.
        creative_effect = cfg.creative_weight * (taste[user_idx] * style[ad_idx]).sum(axis=1) / np.sqrt(STYLE_DIM)
    relevance = _sigmoid(-1.6 + 0.9 * affinity + quality[ad_idx] + device_effect
                         + placement_effect + hour_effect + creative_effect)
    examination = 1.0 / position ** 0.8
    p_click = relevance * examination
    click = rng.random(n) < p_click
    p_conv = _sigmoid(-1.2 + 0.5 * affinity + cvr_quality[ad_idx])
    conversion = click & (rng.random(n) < p_conv)

    logs = pd.DataFrame({
        "user_id": users["user_id"].to_numpy()[user_idx],
        "age_bucket": users["age_bucket"].to_numpy()[user_idx],
        "gender": users["gender"].to_numpy()[user_idx],
        "region": users["region"].to_numpy()[user_idx],
        "device": np.array(DEVICES)[device],
        "placement": np.array(PLACEMENTS)[placement],
        "hour": hour.astype("int64"),
        "weekday": weekday.astype("int64"),
        "ad_id": catalog["ad_id"].to_numpy()[ad_idx],
        "position": position.astype("int64"),
        "timestamp": (seconds + 1_767_225_600).astype("int64"),  # 2026-01-01 UTC
        "click": click.astype("float32"),
        "conversion": conversion.astype("float32"),
        "true_relevance": relevance.astype("float32"),
        "true_p_click": p_click.astype("float32"),
    })
    return SyntheticWorld(users=users, catalog=catalog, logs=logs, config=cfg, schema=schema)
