"""MT-Bench human judgments (Zheng et al. 2023): judge inputs, position-swap combination and agreement.

Agreement follows lm-sys/FastChat fastchat/llm_judge/compute_agreement.py:

* votes are keyed by (question_id, model_1, model_2, turn) with the model pair sorted (model_1 < model_2,
  plain string order) and the winner flipped when the pair was stored the other way round;
* "human" means a judge id starting with "expert" (FastChat's `get_judge_name`; "author_*" votes are a
  separate judge and are not used) -- configurable here via `human_prefixes`;
* for every key the judge voted on, each human vote on that key is one comparison;
* setup S1 keeps ties (any label containing "tie" equals any other such label), setup S2 drops a
  comparison when either side is a tie;
* FastChat prints per turn; the overall figure pools both turns' counts (what the paper's 66% / 85% are).

The judge is run in both presentation orders; each judgment text is read with FastChat's parser
(`verdicts.fastchat_verdict`: [[A]], [[B]], [[C]] = tie, else "error") and `combine_orders` turns the two into
one vote the FastChat way: the same vote in both orders -> that vote, otherwise "tie (inconsistent)"; two
errors stay "error", which agrees with no human vote.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

HF_DATASET_ID = "lmsys/mt_bench_human_judgments"
HF_SPLIT = "human"

LABEL_KEYS: tuple[str, ...] = ("question_id", "model_a", "model_b", "winner", "judge", "turn")
CONVERSATION_KEYS: tuple[str, ...] = ("conversation_a", "conversation_b")
WINNERS = ("model_a", "model_b", "tie")
MT_ORDERS: tuple[str, str] = ("ab", "ba")  # "ab": model_a shown as Assistant A; "ba": swapped

Key = tuple[int, str, str, int]  # (question_id, model_1, model_2, turn), model_1 < model_2


# ----------------------------------------------------------------------------------------------- loading
def _check_row(row: Mapping, where: str, require_conversations: bool) -> dict:
    needed = LABEL_KEYS + (CONVERSATION_KEYS if require_conversations else ())
    missing = [k for k in needed if k not in row or row[k] is None]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    row = dict(row)
    row["question_id"] = int(row["question_id"])
    row["turn"] = int(row["turn"])
    if row["turn"] not in (1, 2):
        raise ValueError(f"{where}: turn must be 1 or 2, got {row['turn']!r}")
    if require_conversations:
        for k in CONVERSATION_KEYS:
            conv = row[k]
            if len(conv) < 2 * row["turn"]:
                raise ValueError(f"{where}: {k} has {len(conv)} messages, turn {row['turn']} needs {2 * row['turn']}")
    return row


def load_mtbench_human(
    source: str, revision: str | None = None, require_conversations: bool = True
) -> list[dict]:
    """Rows of the MT-Bench human-judgment data: question_id, model_a, model_b, winner, judge, turn and
    (when `require_conversations`) conversation_a / conversation_b (lists of {"role", "content"}).

    `source` is a local .jsonl / .jsonl.gz file (also the label-only files with require_conversations=False,
    e.g. gpt4_pair_judgments_labels.jsonl) or the hub id `lmsys/mt_bench_human_judgments` (split `human`,
    at `revision`; needs network access or a warm HF cache). Bad lines raise ValueError with file:line.
    """
    from src.data import iter_jsonl, read_hub

    path = Path(source)
    if path.exists() or source.endswith((".jsonl", ".jsonl.gz", ".json")):
        if not path.exists():
            raise FileNotFoundError(f"MT-Bench file not found: {source}")
        return [_check_row(obj, f"{path}:{lineno}", require_conversations) for lineno, obj in iter_jsonl(path)]
    if source != HF_DATASET_ID:
        raise ValueError(f"source must be a local .jsonl[.gz] file or {HF_DATASET_ID!r}, got {source!r}")
    return [_check_row(r, where, require_conversations) for where, r in read_hub(source, HF_SPLIT, revision)]


# ----------------------------------------------------------------------------------------------- keys
def revert(winner: str) -> str:
    """FastChat `revert`: swap model_a/model_b, leave anything else (ties) alone."""
    if winner == "model_a":
        return "model_b"
    if winner == "model_b":
        return "model_a"
    return winner


def normalize_vote(row: Mapping) -> tuple[Key, str]:
    """FastChat's key normalisation: ((question_id, model_1, model_2, turn), winner) with model_1 < model_2
    and the winner expressed relative to that order."""
    qid, a, b, turn = int(row["question_id"]), row["model_a"], row["model_b"], int(row["turn"])
    if a < b:
        return (qid, a, b, turn), row["winner"]
    return (qid, b, a, turn), revert(row["winner"])


def normalize_row(row: Mapping) -> dict:
    """The row with the model pair in FastChat's sorted order (conversations and winner swapped with it)."""
    row = dict(row)
    if row["model_a"] < row["model_b"]:
        return row
    row["model_a"], row["model_b"] = row["model_b"], row["model_a"]
    if "winner" in row:
        row["winner"] = revert(row["winner"])
    if "conversation_a" in row and "conversation_b" in row:
        row["conversation_a"], row["conversation_b"] = row["conversation_b"], row["conversation_a"]
    return row


def is_tie(vote: str) -> bool:
    """FastChat `convertvote`: any label containing "tie" (e.g. "tie (inconsistent)") is a tie."""
    return "tie" in vote


def equal_vote(v1: str, v2: str) -> bool:
    """FastChat `equalvote`."""
    if is_tie(v1) and is_tie(v2):
        return True
    return v1 == v2


def judge_votes_from_rows(rows: Iterable[Mapping]) -> dict[Key, str]:
    """{normalised key: winner} from label rows of a single judge (e.g. the gpt4_pair split). FastChat asserts
    one judge vote per key; so does this."""
    votes: dict[Key, str] = {}
    for r in rows:
        key, winner = normalize_vote(r)
        if key in votes:
            raise ValueError(f"judge voted twice on {key}")
        votes[key] = winner
    return votes


# ----------------------------------------------------------------------------------------------- judge inputs
def _msg(conv: Sequence[Mapping], i: int) -> str:
    return str(conv[i]["content"])


def build_judge_inputs(row: Mapping, swap: bool = False) -> tuple[str, str, str]:
    """(question_text, answer_a, answer_b) for the pairwise judge on `row`'s turn.

    Turn 1: the first user message and the two first answers.
    Turn 2: FastChat's pair-v2-multi-turn judge shows each assistant's whole two-turn conversation and asks
    it to "focus on who provides a better answer to the second user question". Here the instruction slot
    carries that context as a transcript -- first user message, Assistant A's and Assistant B's first
    answers, second user message, and the same focus note -- and the answer slots the two second answers.

    `swap=True` presents model_b as Assistant A (the transcript's labels follow the presentation, so the
    first-turn answer labelled "Assistant A" is always by the model whose second answer is answer_a).
    """
    conv_a, conv_b = row["conversation_a"], row["conversation_b"]
    if swap:
        conv_a, conv_b = conv_b, conv_a
    turn = int(row["turn"])
    if turn == 1:
        return _msg(conv_a, 0), _msg(conv_a, 1), _msg(conv_b, 1)
    if turn != 2:
        raise ValueError(f"turn must be 1 or 2, got {turn!r}")
    question_text = (
        "Below is a two-turn conversation between a user and two AI assistants. Both assistants answered the "
        "user's first question; the user then asked a second question.\n\n"
        f"### User (first question):\n{_msg(conv_a, 0)}\n\n"
        f"### Assistant A (answer to the first question):\n{_msg(conv_a, 1)}\n\n"
        f"### Assistant B (answer to the first question):\n{_msg(conv_b, 1)}\n\n"
        f"### User (second question):\n{_msg(conv_a, 2)}\n\n"
        "Focus on which assistant provides a better answer to the second user question, in the context of "
        "the conversation above. The answers to the second question follow."
    )
    return question_text, _msg(conv_a, 3), _msg(conv_b, 3)


def combine_orders(v_ab: str | None, v_ba: str | None) -> str:
    """One vote from the two presentation orders, as FastChat combines g1/g2 (common.py `play_a_match_pair`, the
    released gpt4_pair labels). `v_ab`: per-order verdict ("A"/"B"/"tie"/None = FastChat's "error") with model_a
    shown as Assistant A; `v_ba`: with the answers swapped. Both orders agree -> that vote ("model_a", "model_b",
    "tie", or "error" when both are errors, which is no tie and agrees with nobody); they disagree ->
    "tie (inconsistent)". An order that was not judged counts as an error."""
    g1 = {"A": "model_a", "B": "model_b", "tie": "tie"}.get(v_ab, "error")
    g2 = {"A": "model_b", "B": "model_a", "tie": "tie"}.get(v_ba, "error")
    return g1 if g1 == g2 else "tie (inconsistent)"


# ----------------------------------------------------------------------------------------------- agreement
def agreement(
    judge_votes: Mapping[Key, str],
    human_rows: Iterable[Mapping],
    human_prefixes: Sequence[str] = ("expert",),
) -> dict[str, dict[str, tuple[int, int]]]:
    """FastChat agreement between a judge and human votes.

    judge_votes: {normalised key (question_id, model_1, model_2, turn) with model_1 < model_2: winner
    relative to that order ("model_a" = model_1, "model_b", or any label containing "tie")}.
    human_rows: label rows (question_id, model_a, model_b, winner, judge, turn) in any model order; rows whose
    judge id starts with none of `human_prefixes` are ignored.

    Returns {"s1": {"turn1": (agree, total), "turn2": ..., "all": ...}, "s2": {...}}.
    """
    for k in judge_votes:
        if k[1] >= k[2]:
            raise ValueError(f"judge_votes key {k} is not normalised (model_1 < model_2 required)")
    humans: dict[Key, list[str]] = defaultdict(list)
    for r in human_rows:
        if not str(r["judge"]).startswith(tuple(human_prefixes)):
            continue
        key, winner = normalize_vote(r)
        humans[key].append(winner)
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for setup, ban_ties in (("s1", False), ("s2", True)):
        per_turn = {1: [0, 0], 2: [0, 0]}
        for key, hv in humans.items():
            if key not in judge_votes:
                continue
            jv = judge_votes[key]
            if ban_ties and is_tie(jv):
                continue
            for v in hv:
                if ban_ties and is_tie(v):
                    continue
                per_turn[key[3]][1] += 1
                per_turn[key[3]][0] += int(equal_vote(jv, v))
        out[setup] = {
            "turn1": tuple(per_turn[1]),
            "turn2": tuple(per_turn[2]),
            "all": (per_turn[1][0] + per_turn[2][0], per_turn[1][1] + per_turn[2][1]),
        }
    return out


def agreement_metrics(agr: Mapping[str, Mapping[str, tuple[int, int]]]) -> dict[str, float]:
    """mtbench/agreement_s1, mtbench/agreement_s1/turn1, .../turn2, the same for s2, and counts
    mtbench/n_s1[/turnN] (comparisons). A ratio with no comparisons is left out."""
    out: dict[str, float] = {}
    for setup in ("s1", "s2"):
        for part, (agree, total) in agr[setup].items():
            suffix = "" if part == "all" else f"/{part}"
            if total:
                out[f"mtbench/agreement_{setup}{suffix}"] = agree / total
            out[f"mtbench/n_{setup}{suffix}"] = float(total)
    return out


def verdicts_by_key(records: Iterable[Mapping]) -> dict[Key, dict[str, str | None]]:
    """{normalised key: {order: verdict}} from per-(key, order) judge records (see `mtbench_metrics`)."""
    per_key: dict[Key, dict[str, str | None]] = defaultdict(dict)
    for r in records:
        if r["order"] not in MT_ORDERS:
            raise ValueError(f"order must be one of {MT_ORDERS}, got {r['order']!r}")
        verdict = r["verdict"]
        if verdict not in ("A", "B", "tie", None):
            raise ValueError(f"verdict must be 'A', 'B', 'tie' or None, got {verdict!r}")
        a, b = r["model_a"], r["model_b"]
        order = r["order"]
        if a > b:  # normalise: the pair flips, so "model_a shown first" becomes "model_2 shown first"
            a, b = b, a
            order = "ba" if order == "ab" else "ab"
        key = (int(r["question_id"]), a, b, int(r["turn"]))
        if order in per_key[key]:
            raise ValueError(f"duplicate mtbench record for {key} order {order}")
        per_key[key][order] = verdict
    return dict(per_key)


def agreement_by_key(
    records: Iterable[Mapping], human_rows: Iterable[Mapping], human_prefixes: Sequence[str] = ("expert",),
) -> dict[Key, dict[str, tuple[int, int]]]:
    """{key: {"s1": (agree, total), "s2": (agree, total)}} for every key the judge voted on and a human compared:
    the per-key counts `agreement` pools (their sums are its "all" counts), for intervals that resample keys."""
    humans: dict[Key, list[Mapping]] = defaultdict(list)
    for r in human_rows:
        humans[normalize_vote(r)[0]].append(r)
    out = {}
    for key, v in verdicts_by_key(records).items():
        agr = agreement({key: combine_orders(v.get("ab"), v.get("ba"))}, humans.get(key, []), human_prefixes)
        if agr["s1"]["all"][1]:
            out[key] = {s: agr[s]["all"] for s in ("s1", "s2")}
    return out


def mtbench_metrics(
    records: Iterable[Mapping],
    human_rows: Iterable[Mapping],
    human_prefixes: Sequence[str] = ("expert",),
) -> dict[str, float]:
    """Agreement of a position-swapped judge with human votes, from per-(key, order) judge records.

    A record: {"question_id": int, "model_a": str, "model_b": str, "turn": 1|2, "order": "ab"|"ba",
    "verdict": "A"|"B"|"tie"|None} (`verdicts.fastchat_verdict` of the judgment text; None is FastChat's
    "error"); "ab" means model_a was shown as Assistant A. The pair may be in either model order (it is
    normalised here). Orders are combined by `combine_orders`.

    Keys: everything from `agreement_metrics`, plus mtbench/swap_consistency (keys judged in both orders whose
    two verdicts state the same preference under the swap: the same model, or a tie in both orders, which FastChat
    combines to "tie", not "tie (inconsistent)"; orders that disagree, or an order without a verdict, are
    inconsistent), mtbench/parse_fail (records whose text names no verdict: "error"),
    mtbench/n_keys, mtbench/n_records, mtbench/judge_tie_rate (combined votes that are ties, inconsistent
    ones included), mtbench/judge_error_rate (combined votes that are "error": both orders unparsed).
    """
    records = list(records)
    per_key = verdicts_by_key(records)
    n_records, n_fail = len(records), sum(r["verdict"] is None for r in records)
    if not n_records:
        raise ValueError("mtbench_metrics: no records")
    judge_votes = {k: combine_orders(v.get("ab"), v.get("ba")) for k, v in per_key.items()}
    out = agreement_metrics(agreement(judge_votes, human_rows, human_prefixes))
    both = [v for v in per_key.values() if len(v) == 2]
    if both:
        out["mtbench/swap_consistency"] = sum(
            1 for v in both if combine_orders(v["ab"], v["ba"]) in ("model_a", "model_b", "tie")
        ) / len(both)
    out["mtbench/parse_fail"] = n_fail / n_records
    out["mtbench/judge_tie_rate"] = sum(1 for w in judge_votes.values() if is_tie(w)) / len(judge_votes)
    out["mtbench/judge_error_rate"] = sum(1 for w in judge_votes.values() if w == "error") / len(judge_votes)
    out["mtbench/n_keys"] = float(len(per_key))
    out["mtbench/n_records"] = float(n_records)
    return out


# ----------------------------------------------------------------------------------------------- slicing
def judged_keys(rows: Iterable[Mapping], human_prefixes: Sequence[str] | None = ("expert",)) -> list[dict]:
    """One normalised row per key (the first one seen; its conversations are the pair's answers), keeping
    only keys with at least one vote from `human_prefixes` (None = any judge). Each returned row also
    carries "human_votes": [{"judge", "winner"}] for that key, winners relative to the normalised order."""
    first: dict[Key, dict] = {}
    votes: dict[Key, list[dict]] = defaultdict(list)
    for r in rows:
        key, winner = normalize_vote(r)
        if key not in first:
            first[key] = normalize_row(r)
        votes[key].append({"judge": str(r["judge"]), "winner": winner})
    out = []
    for key, row in first.items():
        if human_prefixes is not None and not any(
            v["judge"].startswith(tuple(human_prefixes)) for v in votes[key]
        ):
            continue
        row = {k: v for k, v in row.items() if k not in ("winner", "judge")}
        row["human_votes"] = votes[key]
        out.append(row)
    return out


def stratified_slice(
    rows: Sequence[Mapping],
    max_keys: int | None,
    seed: int,
    human_prefixes: Sequence[str] | None = ("expert",),
) -> list[dict]:
    """Distinct judged keys (see `judged_keys`), at most `max_keys` of them (None = all), seeded, half from
    each turn where possible; interleaved turn 1 / turn 2 so any prefix is balanced too."""
    if max_keys is not None and max_keys < 1:
        raise ValueError(f"max_keys must be >= 1 or None, got {max_keys}")
    keyed = judged_keys(rows, human_prefixes)
    rng = random.Random(seed)
    by_turn: dict[int, list[dict]] = {1: [], 2: []}
    for r in sorted(keyed, key=lambda r: (r["turn"], r["question_id"], r["model_a"], r["model_b"])):
        by_turn[int(r["turn"])].append(r)
    for t in by_turn:
        rng.shuffle(by_turn[t])
    if max_keys is not None:
        n1 = min(len(by_turn[1]), (max_keys + 1) // 2)
        n2 = min(len(by_turn[2]), max_keys - n1)
        n1 = min(len(by_turn[1]), max_keys - n2)
        by_turn = {1: by_turn[1][:n1], 2: by_turn[2][:n2]}
    out: list[dict] = []
    for i in range(max(len(by_turn[1]), len(by_turn[2]))):
        for t in (1, 2):
            if i < len(by_turn[t]):
                out.append(by_turn[t][i])
    return out


def human_rows_from_keyed(keyed_rows: Iterable[Mapping]) -> list[dict]:
    """Label rows rebuilt from `judged_keys` output (for `agreement` when only keyed rows are at hand)."""
    out = []
    for r in keyed_rows:
        for v in r["human_votes"]:
            out.append({
                "question_id": r["question_id"], "model_a": r["model_a"], "model_b": r["model_b"],
                "turn": r["turn"], "judge": v["judge"], "winner": v["winner"],
            })
    return out
