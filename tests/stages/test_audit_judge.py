"""The audit judge (`audit=judge`) for pools without references: plumbing and counts on the tiny random model
(its verdicts are noise; accuracy is not what is tested)."""
import json

from src.rules.audit import judge_audit_stats, judge_outcome
from tests.conftest import TINY, only_run


def test_majority_over_both_orders_and_k_samples():
    # chosen is A in chosen_first, B in chosen_second
    assert judge_outcome([("chosen_first", "A"), ("chosen_second", "B"), ("chosen_second", "A")]) == "chosen"
    assert judge_outcome([("chosen_first", "B"), ("chosen_second", "A"), ("chosen_first", "A")]) == "rejected"
    assert judge_outcome([("chosen_first", "A"), ("chosen_second", "A")]) == "undecided"  # position bias: a tie
    assert judge_outcome([("chosen_first", None), ("chosen_second", None)]) == "undecided"
    assert judge_outcome([("chosen_first", "A"), ("chosen_second", None)]) == "chosen"  # no verdict: not a vote
    rows = [{"majority": m, "votes": [["chosen_first", v]]} for m, v in
            [("chosen", "A"), ("rejected", "B"), ("rejected", "B"), ("undecided", None)]]
    s = judge_audit_stats(rows)
    assert s["audit/judge/pairs"] == 4 and s["audit/judge/votes"] == 4
    assert (s["audit/judge/prefers_chosen"], s["audit/judge/prefers_rejected"], s["audit/judge/undecided"]) == (0.25, 0.5, 0.25)
    assert s["audit/judge/no_verdict"] == 0.25
    assert judge_audit_stats([]) == {"audit/judge/pairs": 0.0}


def test_tiny_run_with_audit_judge_logs_its_votes_to_mlflow(tmp_path):
    """The real CLI, MLflow on, a pool without references (the ShareGPT `reasoning` slice) and an audit judge
    (tiny_random here; a different model than the seed is the point of the real thing), k=2 per order: every pair
    gets 2 orders x 2 votes, the shares of its majority are logged at step 0 as audit/judge/*, its rows as an
    artifact; the exact audit does not run (no references), and a rerun reuses the cached votes."""
    from tests.e2e.test_cli_e2e import cli

    overrides = [o for o in TINY if not o.startswith(("tracking=", "iterations=", "eval.mtbench"))]
    args = [*overrides, "audit=judge", "model@audit.model=tiny_random", "audit.k=2", "audit.max_new_tokens=8",
            "audit.max_response_chars=150", "iterations=0", "eval.mtbench.enabled=false"]
    cli(tmp_path, *args)
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for metric in ["audit/judge/pairs", "audit/judge/prefers_rejected", "audit/judge/prefers_chosen", "audit/judge/undecided",
                   "audit/judge/no_verdict", "audit/judge/votes"]:
        assert [h.step for h in client.get_metric_history(run.info.run_id, metric)] == [0], metric
    assert not any(k.startswith("audit/") and not k.startswith("audit/judge/") for k in m)  # no exact audit here
    assert m["audit/judge/pairs"] == m["generate/pairs"] >= 1  # every pair, train and held-out
    assert m["audit/judge/votes"] == m["audit/judge/pairs"] * 2 * 2
    assert abs(m["audit/judge/prefers_chosen"] + m["audit/judge/prefers_rejected"] + m["audit/judge/undecided"] - 1) < 1e-9
    assert m["audit/judge/no_verdict"] == 0  # constrained reading: every vote has a verdict

    rows = [json.loads(l) for l in open(client.download_artifacts(run.info.run_id, "data/audit_judge_iter0/data.jsonl", str(tmp_path)))]
    assert len(rows) == m["audit/judge/pairs"]
    assert all([o for o, _ in r["votes"]] == ["chosen_first"] * 2 + ["chosen_second"] * 2 for r in rows)
    assert all(r["majority"] == judge_outcome(r["votes"]) for r in rows)
    assert m["audit/judge/prefers_rejected"] == sum(r["majority"] == "rejected" for r in rows) / len(rows)

    cli(tmp_path, *args)  # the same job again: the votes come from the cache
    runs = client.search_runs([client.get_experiment_by_name("ste").experiment_id], "tags.`ste.kind` = 'job'", order_by=["start_time DESC"])
    assert runs[0].data.metrics["cache_hit/audit_judge"] == 1.0
    assert runs[0].data.metrics["audit/judge/prefers_rejected"] == m["audit/judge/prefers_rejected"]
