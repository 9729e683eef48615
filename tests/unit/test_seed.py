import pytest

from torchtitan_runai.seed import SEED_LIMIT, agree_on_seed, check_seed, draw_seed


@pytest.mark.parametrize("seed", [0, 1, 42, SEED_LIMIT - 1, None])
def test_valid_seeds(seed):
    assert check_seed(seed) is None


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT, 2**40, 2**64, 1.5, "7", True])
def test_invalid_seeds(seed):
    assert check_seed(seed)


def test_drawn_seeds_fit_32_bits_with_pp_headroom():
    draws = [draw_seed() for _ in range(2000)]
    assert all(0 <= s < SEED_LIMIT - 2**16 for s in draws)
    assert len(set(draws)) > 1990  # actually random


def test_configured_seed_is_kept_and_unset_is_drawn_without_process_group():
    assert agree_on_seed(123, device="cpu") == 123
    assert 0 <= agree_on_seed(None, device="cpu") < SEED_LIMIT
