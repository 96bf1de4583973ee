"""The scoring pool: a stuck item times out, a dead worker is an error, the pool answers on, no reward has network.

Targets are standard-library functions (`time:sleep`, `signal:raise_signal`, `socket:create_connection`),
so the workers need nothing from the tests to import."""

import signal
import socket
import time

from dspost.rewards import ScoringPool, verify_math_batch
from dspost.rewards.pool import pool_unavailable


def test_a_stuck_item_times_out_and_the_pool_answers_on():
    t = time.monotonic()
    with ScoringPool(1) as pool:
        verdicts = pool.map("time:sleep", [(0,), (60,), (0,)], timeout=1.5)
        assert pool.restarts == 1  # the stuck worker was killed and replaced
    assert verdicts[0] is None and verdicts[2] is None  # time.sleep's own result: answered after the kill
    assert verdicts[1].status == "timeout" and verdicts[1].score == 0.0
    assert time.monotonic() - t < 20


def test_a_worker_killed_mid_item_is_an_error_and_the_pool_answers_on():
    items = [(signal.SIGCONT,), (signal.SIGKILL,), (signal.SIGCONT,), (signal.SIGCONT,)]  # SIGKILL: its own process
    with ScoringPool(1) as pool:
        verdicts = pool.map("signal:raise_signal", items, timeout=20)
        assert pool.restarts == 1
    assert verdicts[1].status == "error" and "died" in verdicts[1].detail
    assert [verdicts[i] for i in (0, 2, 3)] == [None, None, None]


def _listening() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.5)
    return srv


def _connected(srv: socket.socket) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except TimeoutError:
        return False


def test_a_reward_cannot_reach_the_network():
    assert pool_unavailable() is None  # the pre-flight recipe checks use: workers do start isolated here
    with _listening() as srv, ScoringPool(2) as pool:
        port = srv.getsockname()[1]
        verdicts = pool.map("socket:create_connection", [(("127.0.0.1", port), 2)] * 2, timeout=10)
        assert all(v.status == "error" for v in verdicts), verdicts
        assert not _connected(srv)
        # the math reward runs in the same isolated workers
        assert [v.status for v in verify_math_batch([("\\boxed{4}", "4"), ("\\boxed{5}", "4")], pool=pool)] == \
            ["correct", "wrong"]


def test_a_rewards_import_is_not_its_first_items_time():
    """A worker imports the reward before the item's clock starts: a 2 s import under a 1 s item timeout."""
    with ScoringPool(2) as pool:
        verdicts = pool.map("slow_import_reward:score", [("x", {})] * 4, timeout=1.0)
    assert [v.status for v in verdicts] == ["correct"] * 4


def test_a_reward_that_cannot_be_imported_is_an_error_for_every_item():
    with ScoringPool(1) as pool:
        verdicts = pool.map("no_such_module_here:score", [("x", {})] * 3, timeout=5.0)
        assert [v.status for v in verdicts] == ["error"] * 3 and "No module named" in verdicts[0].detail
        assert pool.map("time:sleep", [(0,)], timeout=5.0) == [None]  # the pool answers on
