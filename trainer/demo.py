"""`adrec demo`: synthetic world -> train -> export -> serve over gRPC -> recommend -> metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from features.history import HISTORY
from trainer.config import JobConfig
from trainer.progress import log
from trainer.trained import TrainedModels


def demo_requests(trained: TrainedModels, n_users: int) -> list[tuple[dict, dict, list[str]]]:
    """The most active test users, each in the context of their last test impression, with the
    history (recently clicked ads, newest first) a serving system knows at that moment."""
    schema = trained.schema
    test = trained.split.test
    top_users = test[schema.user_id].value_counts().index[:n_users]
    requests = []
    for user_id in top_users:
        row = test[test[schema.user_id] == user_id].iloc[-1]
        user = {n: row[n] for n in (schema.user_id, *schema.user_categoricals)}
        context = {n: (int(row[n]) if schema.is_int_feature(n) else row[n])
                   for n in (*schema.context_categoricals, *schema.context_integers)}
        history = [a for a in row[HISTORY] if a] if HISTORY in test.columns else []
        requests.append((user, context, history))
    return requests


def own_user_ids(cfg: JobConfig, key: bytes | None) -> dict[str, str]:
    """Pseudonym -> the synthetic world's own user id. The job only ever saw pseudonyms; the demo plays
    a caller, who knows its users by their own ids and leaves the hashing to the client."""
    if key is None or cfg.data.source != "synthetic":
        return {}
    from features import generate_world
    from serving.pseudonym import pseudonym

    world = generate_world(cfg.data.synthetic)
    return {pseudonym(i, key): i for i in world.logs[world.schema.user_id].astype(str).unique()}


def format_metrics(metrics: dict) -> str:
    r, k = metrics["retrieval"], metrics["ranking"]
    ks = [c.split("@")[1] for c in r["model"] if c.startswith("recall@")]
    lines = [f"Retrieval, held-out clicks after the time cutoff ({r['test_positives']} clicks, "
             f"catalog of {r['catalog_size']} ads):",
             f"  {'':30s}" + "".join(f"{'Recall@' + c:>11s}" for c in ks) + f"{'NDCG@' + ks[-1]:>10s}"]
    rows = [("two-tower + BERT + history", "model"), ("ID-only two-tower (TFRS)", "id_only"),
            ("most-popular", "most_popular"), ("  warm ads (model)", "model_warm"),
            (f"  cold-start ads ({r['cold_test_positives']}), model", "model_cold"),
            ("  cold-start ads, ID-only", "id_only_cold")]
    for label, key in rows:
        if key in r:
            lines.append(f"  {label:30s}" + "".join(f"{r[key]['recall@' + c]:11.3f}" for c in ks)
                         + f"{r[key]['ndcg@' + ks[-1]]:10.3f}")
    top = f"recall@{ks[-1]}"
    for name, key in (("most-popular", "most_popular"), ("the ID-only two-tower", "id_only")):
        if key in r:
            ratio = r["model"][top] / max(r[key][top], 1e-9)
            verdict = "beats" if ratio > 1 else "DOES NOT beat"
            lines.append(f"  -> the model {verdict} {name} at Recall@{ks[-1]} ({ratio:.2f}x)")
    lines.extend(format_ranking_metrics(k))
    return "\n".join(lines)


def _auc(k: dict, name: str) -> str:
    """An AUC to 4 places, or why it is undefined (`trainer.labels.ranking_label_notes`)."""
    value = k[name]
    if value == value:
        return f"{value:.4f}"
    return f"undefined ({k.get(name + '_undefined', 'one label class')})"


def _ranking_rows(k: dict) -> str:
    if k.get("negatives") == "sampled":
        return (f"held-out positives ({k['test_positives']}) + {k['sampled_negatives_per_positive']} sampled "
                f"negatives each ({k['test_impressions']} rows; implicit feedback, so 'CTR' is the positive share)")
    return f"held-out impressions ({k['test_impressions']})"


def format_ranking_metrics(k: dict) -> list[str]:
    """CTR (served: position dropped, calibrated), CVR and the oracle's AUCs, one block."""
    lines = [f"Ranking, {_ranking_rows(k)}: CTR AUC {_auc(k, 'auc')}, "
             f"log loss {k['logloss']:.4f}, ECE {k['ece']:.4f} (uncalibrated {k['ece_uncalibrated']:.4f}), "
             f"mean pCTR {k['mean_pctr']:.4f} vs CTR {k['ctr']:.4f}"]
    if "auc_with_position" in k:
        lines.append(f"  with the position tower at the logged position: AUC {_auc(k, 'auc_with_position')}")
    if "oracle_auc" in k:
        lines.append(f"  ground-truth oracle AUC {_auc(k, 'oracle_auc')} (knows position), "
                     f"{_auc(k, 'oracle_auc_no_position')} (true relevance only)")
    if "cvr_auc" in k:
        lines.append(f"  CVR on {k['clicked_impressions']} clicked impressions: AUC {_auc(k, 'cvr_auc')}, "
                     f"log loss {k['cvr_logloss']:.4f}, ECE {k['cvr_ece']:.4f}; pCTCVR over all impressions: "
                     f"AUC {_auc(k, 'ctcvr_auc')}, ECE {k['ctcvr_ece']:.4f}")
    return lines


def run_demo(cfg: JobConfig, n_users: int = 3, k: int = 5, progress: bool = True) -> dict:
    from serving.client import RecommendationClient
    from serving.process import ServerProcess
    from trainer.privacy import job_key
    from trainer.progress import stdout_to_stderr
    from trainer.task import train_and_export

    started = time.time()
    with stdout_to_stderr():  # progress bars are logs; stdout is for the recommendations and metrics
        trained, export = train_and_export(cfg, export=True, progress=progress)
    export_dir = Path(cfg.export.export_dir)
    log(f"starting the embedded TF Serving-compatible server on 127.0.0.1 for {export_dir}")
    schema = trained.schema
    catalog = trained.catalog.set_index(schema.ad_id)
    # Any schema: show one ad categorical (the category when there is one) and the first text field.
    label = ["category"] if "category" in schema.ad_categoricals else list(schema.ad_categoricals[:1])
    text = list(schema.ad_text[:1])
    shown, next_pages = {}, {}
    key = job_key(cfg)
    own_ids = own_user_ids(cfg, key)
    with ServerProcess(export_dir, lifetime=600) as server:
        log(f"server pid {server.pid} at {server.address}")
        # The job's own key (None: the job kept plain ids), not whatever $ADREC_PSEUDONYM_KEY holds.
        with RecommendationClient(server.address, model_name="recommender", pseudonym_key=key, key_env=None) as client:
            for user, context, history in demo_requests(trained, n_users):
                user[schema.user_id] = own_ids.get(user[schema.user_id], user[schema.user_id])
                ads = client.recommend_df(user, context, k=k, history=history)
                ads = ads.join(catalog[label + text], on="ad_id")
                shown[user["user_id"]] = ads
                about = ", ".join(str(user[n]) for n in schema.user_categoricals)
                print(f"\nuser {user['user_id']}" + (f" ({about})" if about else "") + f" on {context}")
                with pd.option_context("display.width", 160, "display.max_colwidth", 48):
                    print(ads[["rank", "ad_id", *label, "score", "pctr", "pcvr", "retrieval_scores", *text]]
                          .to_string(index=False, float_format=lambda x: f"{x:.4f}"))
                # The next page of the same request: the ads just shown are excluded in the graph.
                shown_ids = list(ads["ad_id"])
                more = client.recommend(user, context, k=k, history=history, exclude=shown_ids)
                next_pages[user["user_id"]] = [a.ad_id for a in more]
                print(f"  with those {len(shown_ids)} marked as shown: {', '.join(a.ad_id for a in more)}")
    log(f"server stopped (pid {server.pid})")
    print()
    print(format_metrics(trained.metrics))
    log(f"demo finished in {time.time() - started:.0f}s; models at {export_dir} (version {export.version})")
    return {"metrics": trained.metrics, "recommendations": shown, "next_pages": next_pages,
            "version": export.version}
