"""Routing tables: range/modulo from the model's definition, zipf balance, reports, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from complexity.cli import main
from complexity.routing import balance_report, build_routing_table, count_token_frequencies


def zipf_counts(vocab: int, seen: int | None = None, s: float = 1.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    counts = np.floor(1e7 / ranks**s).astype(np.int64)
    counts = counts[rng.permutation(vocab)]  # frequency unrelated to id
    if seen is not None:
        counts[np.argsort(-counts, kind="stable")[seen:]] = 0
    return counts


def test_range_and_modulo_match_model_definition():
    from complexity.modeling_complexity import default_routing_table

    for strategy in ("range", "modulo"):
        t = build_routing_table(strategy, 1000, 8)
        assert t.dtype == torch.long and t.shape == (1000,)
        assert torch.equal(t, default_routing_table(1000, 8, strategy))
    ids = torch.arange(1000)
    assert torch.equal(build_routing_table("modulo", 1000, 8), ids % 8)
    assert torch.equal(build_routing_table("range", 1000, 8), ids * 8 // 1000)


def test_zipf_beats_modulo_and_range():
    counts = zipf_counts(32000)
    reports = {
        s: balance_report(build_routing_table(s, 32000, 8, counts), counts, 8) for s in ("zipf", "modulo", "range")
    }
    assert reports["zipf"]["max_over_mean"] < reports["modulo"]["max_over_mean"]
    assert reports["zipf"]["max_over_mean"] < reports["range"]["max_over_mean"]
    # the heaviest token alone is ~ 1/sum(1/r^1.1) of the mass; greedy balance is as good as that allows
    top_share = counts.max() / counts.sum()
    assert reports["zipf"]["max_over_mean"] <= max(1.01, top_share * 8 + 1e-9)
    assert abs(sum(reports["zipf"]["mass_share"]) - 1) < 1e-9
    assert sum(reports["zipf"]["num_ids"]) == 32000


def test_zipf_greedy_rule_small_example():
    counts = np.array([5, 9, 9, 1, 0, 0, 0, 4])
    t = build_routing_table("zipf", 8, 3, counts).tolist()
    # order by count desc, ties by id: 1(9)->e0, 2(9)->e1, 0(5)->e2, 7(4)->e2 (mass 5<9), 3(1)->e0 (9 ties 9: lowest)
    assert t[1] == 0 and t[2] == 1 and t[0] == 2 and t[7] == 2 and t[3] == 0
    # unseen ids 4, 5, 6 go to the experts with fewest ids: e1 (1 id), then e0/e1 (2 ids)...
    assert t[4] == 1 and t[5] == 0 and t[6] == 1
    rep = balance_report(torch.tensor(t), counts, 3)
    assert rep["num_ids"] == [3, 3, 2]


def test_unseen_ids_spread_evenly():
    counts = zipf_counts(10_000, seen=300)
    t = build_routing_table("zipf", 10_000, 16, counts)
    ids_per_expert = np.bincount(t.numpy(), minlength=16)
    assert ids_per_expert.max() - ids_per_expert.min() <= 1
    all_zero = build_routing_table("zipf", 100, 8, np.zeros(100, dtype=np.int64))
    assert np.bincount(all_zero.numpy(), minlength=8).tolist() == [13, 13, 13, 13, 12, 12, 12, 12]


def test_zipf_balances_a_large_vocab():
    """128k Zipf-distributed ids over 64 experts: the experts heavier than the lightest hold one
    seen id each (a top token alone outweighs an even share), and the rest are even within 1%."""
    counts = zipf_counts(128_000)
    t = build_routing_table("zipf", 128_000, 64, counts)
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 63
    mass = np.bincount(t.numpy(), weights=counts, minlength=64)
    seen_ids = np.bincount(t.numpy(), weights=counts > 0, minlength=64)
    heavy = mass > 1.01 * mass.min()
    assert 0 < heavy.sum() < 64 and (seen_ids[heavy] == 1).all()


def test_count_token_frequencies_and_errors():
    toks = np.array([[0, 1, 1], [3, 3, 3]], dtype=np.uint16)
    assert count_token_frequencies(toks, 5).tolist() == [1, 2, 0, 3, 0]
    assert count_token_frequencies(torch.tensor([2, 2]), 3).tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        count_token_frequencies([5], 3)
    with pytest.raises(ValueError, match="needs token counts"):
        build_routing_table("zipf", 10, 2)
    with pytest.raises(ValueError, match="shape"):
        build_routing_table("zipf", 10, 2, np.ones(9, dtype=np.int64))
    with pytest.raises(ValueError, match="unknown routing strategy"):
        build_routing_table("hash", 10, 2)
    with pytest.raises(ValueError, match=r"num_experts=11 exceeds the vocabulary \(10 ids\)"):
        build_routing_table("modulo", 10, 11)


def test_cli_build(tmp_path, capsys):
    from safetensors.torch import load_file

    counts = zipf_counts(2000)
    np.save(tmp_path / "counts.npy", counts)
    out = tmp_path / "table.safetensors"
    assert (
        main(["routing", "build", "--counts", str(tmp_path / "counts.npy"), "--experts", "4", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    for s in ("zipf", "modulo", "range"):
        assert s in text
    table = load_file(str(out))["routing_table"]
    assert torch.equal(table, build_routing_table("zipf", 2000, 4, counts))
    assert (
        main(
            [
                "routing",
                "build",
                "--counts",
                str(tmp_path / "counts.npy"),
                "--experts",
                "4",
                "--strategy",
                "modulo",
                "--out",
                str(tmp_path / "t.npy"),
                "--vocab-size",
                "2048",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "t.npy").tolist() == (np.arange(2048) % 4).tolist()
    capsys.readouterr()
    # an existing table is replaced only with --force (it was overwritten silently)
    again = ["routing", "build", "--counts", str(tmp_path / "counts.npy"), "--experts", "2", "--out", str(out)]
    assert main(again) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {out}: already exists (--force replaces it)")
    assert torch.equal(load_file(str(out))["routing_table"], table)
    assert main([*again, "--force"]) == 0
    assert torch.equal(load_file(str(out))["routing_table"], build_routing_table("zipf", 2000, 2, counts))
    capsys.readouterr()
    assert main(["routing", "build", "--counts", str(tmp_path / "missing.npy"), "--experts", "4"]) == 2
    assert "missing.npy: no such counts file" in capsys.readouterr().err


def test_cli_build_refuses_bad_flags_by_name(tmp_path, capsys):
    # --vocab-size 0 used to mean "len(counts)", --experts 0 failed with a message naming no flag
    # after the header was printed, a .txt name got a safetensors file
    np.save(tmp_path / "counts.npy", zipf_counts(100))
    np.save(tmp_path / "negative.npy", np.array([3, -1, 2]))
    cases = [
        (["--experts", "0"], "--experts: must be a positive integer, got 0"),
        (["--experts", "4", "--vocab-size", "0"], "--vocab-size: must be a positive integer, got 0"),
        (["--experts", "4", "--out", str(tmp_path / "t.txt")], f"--out {tmp_path / 't.txt'}: expected a .safetensors"),
        (
            ["--experts", "2", "--counts", str(tmp_path / "negative.npy")],
            "negative.npy: counts must be >= 0, got -1 at id 1",
        ),
        (["--experts", "101"], "--experts 101 exceeds the vocabulary (100 ids): some experts would get no id"),
    ]
    for flags, message in cases:
        capsys.readouterr()
        assert main(["routing", "build", "--counts", str(tmp_path / "counts.npy"), *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.npy", "negative.npy"]
