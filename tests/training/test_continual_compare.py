"""``python -m training.continual_compare`` end to end on the tiny model (a smoke run: tiny sizes)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from adapters.store import AdapterStore
from training.continual_compare import STRATEGIES, main


def test_the_comparison_trains_four_ways_and_reports_both_tasks(tmp_path, tiny_base_dir, capsys):
    out = tmp_path / "compare"
    argv = ["--out", str(out), "--base-model", str(tiny_base_dir), "--quantization", "none"]
    argv += ["--train-rows", "16", "--test-rows", "3", "--max-tokens", "6", "--lr", "1e-2", "--r", "2"]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["orders-only", *STRATEGIES]
    for row in results.values():
        for task in ("orders", "returns"):
            assert 0.0 <= row[task]["exact_match"] <= 1.0 and row[task]["n"] == 3
    assert results["separate"]["orders"]["adapter"] == "orders"  # the old task keeps its own adapter
    assert results["separate"]["returns"]["adapter"] == "returns-separate"
    assert (out / "continual_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert all(strategy in table for strategy in STRATEGIES)

    store = AdapterStore(out / "adapters")
    cards = {name: store.read_card(name) for name in ("returns-naive", "returns-replay", "returns-ewc")}
    assert all(card["continual"]["resumed_from"] == "orders" for card in cards.values())
    assert cards["returns-replay"]["data"]["old_task"]["replayed_rows"] > 0
    assert cards["returns-naive"]["data"]["old_task"]["replayed_rows"] == 0
    assert cards["returns-ewc"]["continual"]["ewc_lambda"] > 0
    orders = load_file(store.require("orders") / "adapter_model.safetensors")
    for name in cards:  # each continuation really moved away from the orders adapter
        continued = load_file(store.require(name) / "adapter_model.safetensors")
        assert any(not torch.equal(orders[key], continued[key]) for key in orders)
