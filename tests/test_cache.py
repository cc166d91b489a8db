"""KVLayer's growth: appends reuse spare room, and no tensor handed out ever changes its content."""

import torch

from kvlife.cache import KVLayer


def _states(n: int, start: float):
    keys = torch.arange(n * 4, dtype=torch.float32).reshape(1, 1, n, 4) + start
    return keys, keys + 0.5


def test_decoding_appends_in_place_after_the_first_update():
    layer = KVLayer()
    keys, _ = layer.update(*_states(10, 0.0))
    first = keys.untyped_storage().data_ptr()
    for step in range(5):
        keys, values = layer.update(*_states(1, 1000.0 + step))
    assert keys.shape[-2] == 15 and keys.untyped_storage().data_ptr() == first
    assert layer.positions.tolist() == [list(range(15))]


def test_a_checkpoint_survives_rollback_and_new_appends():
    layer = KVLayer()
    layer.update(*_states(8, 0.0))
    saved = layer.checkpoint()
    before = saved.keys.clone()
    layer.update(*_states(3, 100.0))  # an answer...
    answer = layer.keys.clone()
    held = layer.keys
    layer.rollback(saved)
    layer.update(*_states(2, 500.0))  # ...cut back, then another query
    assert torch.equal(saved.keys, before) and torch.equal(held, answer)  # neither view was overwritten
    assert torch.equal(layer.keys[..., :8, :], before) and layer.keys.shape[-2] == 10
    assert layer.positions.tolist() == [list(range(10))] and layer.next_position == 10


def test_growth_past_the_spare_room_keeps_every_token():
    layer = KVLayer()
    total = 0
    for chunk in (5, 300, 1, 700, 1):
        keys, values = layer.update(*_states(chunk, float(total)))
        total += chunk
    assert keys.shape[-2] == total and torch.equal(values, keys + 0.5)
