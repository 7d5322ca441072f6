"""Cloud-side lookahead over real HTTP with the seeded NumPy models: the device walks
the cloud's tree and sends several tokens per round trip, and the output stays
exactly per-token CoSteer's, for every method and sampling mode."""

from __future__ import annotations

import json

import pytest

from costeer import CloudConfig, CoSteer, UserError
from costeer.cli import main
from costeer.methods import METHODS, make_policy
from costeer.transport.server.app import create_app
from support.fake_servers import RequestLog
from support.fakes import NumpyModel
from support.servers import app_in_thread
from support.split_fixtures import CONTEXT, PROMPT, device, embedded, served  # noqa: F401  (fixtures)

# methods whose cloud stream is public (llm-context's is refused over a network)
CLOUD_METHODS = [m for m in sorted(METHODS) + ["mix:0.5"]
                 if any(s.role == "llm" and s.prompt == "public" for s in make_policy(m, None, "closed", 64).streams)]


@pytest.mark.parametrize("method", CLOUD_METHODS)
@pytest.mark.parametrize("tree", [(1, 1, 0.0), (3, 1, 0.0), (2, 4, 0.0), (3, 2, 0.0), (3, 1, 0.5), (2, 4, 0.3)])
def test_lookahead_greedy_equals_embedded_with_fewer_round_trips(served, embedded, method, tree):
    url, _ = served
    remote = device(url, lookahead=tree, top_k=4).generate(PROMPT, CONTEXT, method=method, max_new_tokens=32)
    local = embedded.generate(PROMPT, CONTEXT, method=method, max_new_tokens=32)
    assert remote.token_ids == local.token_ids and remote.new_tokens > 8
    t = remote.traffic
    assert t["lookahead_tokens"] > 0 and t.get("uncertified_steps", 0) == 0
    # one request opens the session; each later request carries one chosen token beyond the tree walk
    steps = t["round_trips"] - 1 - sum(t.get("escalations", {}).values())
    assert steps + t["lookahead_tokens"] == remote.new_tokens - 1 + (remote.finish_reason == "eos")
    assert t["round_trips"] < remote.new_tokens


@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.8),
                                      dict(temperature=0.9)])
def test_lookahead_sampling_is_exact(served, embedded, sampling):
    url, _ = served
    cs = device(url, lookahead=(2, 3, 0.0), top_k=4)
    for seed in range(3):
        remote = cs.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling)
        assert remote.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=20, seed=seed, **sampling).token_ids
        assert remote.traffic["uncertified_steps"] == 0


@pytest.mark.parametrize("tree", [(2, 4, 0.0), (3, 1, 0.0)])
def test_escalating_inside_the_tree_sends_the_walk_first(served, embedded, tree):
    """k = 1 rarely certifies: the device asks for more at tree nodes the server has not
    reached, and at the root while a chain is still streaming."""
    url, _ = served
    g = device(url, lookahead=tree, top_k=1).generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30)
    assert g.token_ids == embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=30).token_ids
    assert g.traffic["escalations"] and g.traffic["uncertified_steps"] == 0


@pytest.mark.parametrize("tree", [(2, 4, 0.0), (3, 1, 0.0)])
def test_the_device_sends_only_the_tokens_it_chose(served, tmp_path, tree):
    url, _ = served
    wire = tmp_path / "wire.jsonl"
    g = device(url, lookahead=tree, wire_log=wire, simulate_rtt_ms=2).generate(PROMPT, CONTEXT, max_new_tokens=24)
    sent = [json.loads(line)["body"] for line in wire.read_text().splitlines()]
    sent = [b for b in sent if b and "tokens" in b]
    appended = [t for body in sent for t in body["tokens"]]
    # every chosen token once, in order (the last one needs no reply); nothing else
    assert appended == g.token_ids[: len(appended)] and len(appended) >= g.new_tokens - tree[0] - 1
    assert all(set(b) - {"stream", "path"} == {"tokens", "top_k"} for b in sent)
    assert all("canary" not in json.dumps(b) for b in sent)


def test_tree_tokens_cost_the_server_no_extra_pass():
    cloud = NumpyModel(1, "numpy-cloud")
    with app_in_thread(create_app(cloud)) as url:
        g = device(url, lookahead=(1, 4, 0.0)).generate(PROMPT, CONTEXT, method="llm", max_new_tokens=20)
    # llm picks the cloud's argmax, always in the tree: every other token comes from a tree node,
    # and each request costs one pass for its new token plus one for the tree level
    assert g.traffic["lookahead_tokens"] >= (g.new_tokens - 1) // 2
    assert cloud.forward_passes <= 2 * g.traffic["round_trips"]


def test_a_tree_too_large_or_unsupported_is_refused_clearly(served, capsys):
    url, _ = served
    assert main(["generate", "--cloud", url, "--lookahead", "4,8", "--prompt", PROMPT]) == 2
    assert "nodes" in capsys.readouterr().err
    assert main(["generate", "--cloud", url, "--lookahead", "two", "--prompt", PROMPT]) == 2
    assert "DEPTH,WIDTH" in capsys.readouterr().err

    class NoTrees(NumpyModel):
        supports_lookahead = False

    with app_in_thread(create_app(NoTrees(1))) as other:
        with pytest.raises(UserError, match="does not offer lookahead"):
            device(other, lookahead=(2, 2)).generate(PROMPT, CONTEXT, max_new_tokens=4)
    with pytest.raises(UserError, match="remote cloud"):
        CloudConfig("", lookahead=(2, 2))


def _opens(log: RequestLog, since: int) -> list[dict]:
    return [json.loads(body) for path, body in log.bodies[since:] if path.endswith("/sessions")]


@pytest.mark.parametrize("method", ["costeer", "mix:1"])
def test_auto_lookahead_stays_per_token_near_and_asks_trees_far(served, embedded, method):
    """The default, lookahead="auto": on loopback the session opens without a tree, as
    before; behind a 90 ms round trip it opens with 3,1,0.5. The tokens are the same."""
    url, log = served
    expected = embedded.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24).token_ids
    before = len(log.bodies)
    near = device(url).generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
    assert near.token_ids == expected
    assert near.traffic["lookahead_auto_rtt_ms"] < 80 and near.traffic["lookahead_tokens"] == 0
    assert [("lookahead" in o) for o in _opens(log, before)] == [False]
    before = len(log.bodies)
    far = device(url, simulate_rtt_ms=90).generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
    assert far.token_ids == expected
    assert far.traffic["lookahead_auto_rtt_ms"] >= 80
    assert [o.get("lookahead") for o in _opens(log, before)] == [dict(depth=3, width=1, top_k=64, min_probability=0.5)]
    assert far.traffic["lookahead_tokens"] > 0
    assert far.traffic["round_trips"] < near.traffic["round_trips"]


def test_auto_lookahead_is_silent_where_trees_are_not_offered_and_off_turns_it_off(served, capsys):
    class NoTrees(NumpyModel):
        supports_lookahead = False

    with app_in_thread(create_app(NoTrees(1))) as other:
        g = device(other, simulate_rtt_ms=90).generate(PROMPT, CONTEXT, max_new_tokens=6)
        assert g.traffic["lookahead_tokens"] == 0 and "lookahead_auto_rtt_ms" not in g.traffic
    url, _ = served
    g = device(url, simulate_rtt_ms=90, lookahead=None).generate(PROMPT, CONTEXT, max_new_tokens=6)
    assert g.traffic["lookahead_tokens"] == 0 and "lookahead_auto_rtt_ms" not in g.traffic
    assert main(["generate", "--cloud", url, "--lookahead", "off", "--simulate-rtt", "90", "--prompt", PROMPT,
                 "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traffic"]["lookahead_tokens"] == 0
    with pytest.raises(UserError, match="'auto' or None"):
        CloudConfig(url, lookahead="sometimes")
