"""PPO math against independent references (direct loops in float64, hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.align.ppo import (
    PPOConfig,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    per_token_kl_rewards,
    position_ids_from_mask,
    response_mask_from_ids,
    whiten,
)


def _gae_reference(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} over the REAL steps of each row (padded steps removed),
    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last real step; plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        n = len(steps)
        v = [values[b][t] for t in steps] + [0.0]
        r = [rewards[b][t] for t in steps]
        delta = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            a = sum((gamma * lam) ** (j - i) * delta[j] for j in range(i, n))
            adv[b][steps[i]] = a
            ret[b][steps[i]] = a + v[i]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_direct_sum_with_padding(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 5, 1, 0, 7]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    mask[4] = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0])  # left padding and a hole: both skipped
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # padded steps get nothing; garbage in padded rewards/values changes nothing
    assert (adv[mask == 0] == 0).all()
    noisy_r = rewards.masked_fill(mask == 0, 123.0)
    noisy_v = values.masked_fill(mask == 0, -77.0)
    adv2, ret2 = gae(noisy_r, noisy_v, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_hand_computed():
    # one row of 2 real steps + 1 pad, gamma=1, lam=0.5
    r = torch.tensor([[0.0, 1.0, 9.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.25, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # delta_1 = 1 + 0 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1.0, 0.0]], dtype=torch.float64))


def test_masked_stats_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 3.5], dtype=torch.float64))
    assert masked_var(x, m).item() == pytest.approx(5.0 / 3.0)  # unbiased var of 1,2,3,4
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(1.25)
    w = whiten(x, m, shift_mean=True)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expect = (vals - 2.5) / math.sqrt(5.0 / 3.0 + 1e-8)
    torch.testing.assert_close(w[m.bool()], expect)
    assert (w[~m.bool()] == 0).all()
    w_keep = whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w_keep[m.bool()], expect + 2.5)
    assert masked_mean(w_keep, m).item() == pytest.approx(2.5)


def test_clipped_policy_loss_both_sides_hand_computed():
    clip = 0.2
    # ratios: 1.5 (A>0: clipped to 1.2), 0.5 (A>0: unclipped 0.5 is smaller -> used),
    #         1.5 (A<0: unclipped -A*1.5 is larger -> used), 0.5 (A<0: clipped 0.8 used), pad
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], dtype=torch.float64)
    new = old + ratio.log()
    loss, clipfrac, approx_kl = clipped_policy_loss(new, old, adv, mask, clip)
    per_token = [-2.0 * 1.2, -2.0 * 0.5, 1.0 * 1.5, 1.0 * 0.8]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert clipfrac.item() == pytest.approx(2 / 4)  # tokens 0 and 3 use the clipped branch
    logs = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)]
    assert approx_kl.item() == pytest.approx(0.5 * sum(v * v for v in logs) / 4)
    # the gradient is zero exactly where the clip is active
    new_req = new.clone().requires_grad_(True)
    clipped_policy_loss(new_req, old, adv, mask, clip)[0].backward()
    g = new_req.grad[0]
    assert g[0] == 0 and g[3] == 0 and g[4] == 0
    assert g[1].item() == pytest.approx(-2.0 * 0.5 / 4) and g[2].item() == pytest.approx(1.0 * 1.5 / 4)


def test_clipped_value_loss_both_sides_hand_computed():
    clip = 0.2
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 1.0, 1.1, 7.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip)
    # tok0: V=1 -> err 1; Vclip=0.2 -> err 3.24 (clipped larger, used)
    # tok1: V=1 -> err 4; Vclip=0.2 -> err 1.44 (unclipped used)
    # tok2: V=1.1 within clip of 1.0 -> both 1.21
    expect = 0.5 * (3.24 + 4.0 + 1.21) / 3
    assert loss.item() == pytest.approx(expect)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_per_token_kl_rewards_places_score_and_penalty():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-2.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = torch.tensor([3.0, 1.0, 5.0])
    has_eos = torch.tensor([True, False, True])
    rewards, kl, adj = per_token_kl_rewards(lp, ref, mask, 0.1, scores, 2.0, has_eos)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0] * 4]))
    expect = torch.tensor(
        [
            [-0.05, 0.1, 3.0, 0.0],  # score at the last real token (index 2), padding untouched
            [-0.1, -0.1, -0.1, -0.1 + 1.0 - 2.0],  # no EOS: score 1 - penalty 2
            [0.0, 0.0, 0.0, 0.0],  # empty response: nothing to place the score on
        ]
    )
    torch.testing.assert_close(rewards, expect)
    torch.testing.assert_close(adj, torch.tensor([3.0, -1.0, 5.0]))
    rewards0, _, adj0 = per_token_kl_rewards(lp, ref, mask, 0.1, scores, None, has_eos)
    torch.testing.assert_close(adj0, scores)


def test_logprobs_and_entropy_match_direct_formulas():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    lp = logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].tolist()
            lse = math.log(sum(math.exp(v) for v in z))
            assert lp[b, t].item() == pytest.approx(z[labels[b, t]] - lse, abs=1e-6)
            p = [math.exp(v - lse) for v in z]
            assert entropy_from_logits(logits)[b, t].item() == pytest.approx(
                -sum(q * math.log(q) for q in p), abs=1e-6
            )


def test_response_mask_positions_and_last_index():
    eos = 1
    resp = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    mask, has_eos = response_mask_from_ids(resp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]
    assert last_token_index(mask).tolist() == [2, 1, 4, 0]
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(attn).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_config_validation_messages():
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="value_model"):
        PPOConfig(value_model="twin")


def test_nucleus_sampling_is_refused_for_ppo():
    """PPO's ratio and KL use log-probs of the full distribution, so top_p < 1 (nucleus-sampled rollouts) is
    refused with the reason and the fix, in PPOConfig and when the recipe is loaded (so --dry-run says it);
    align.top_p < 1 stays fine for the other methods, and for ppo when align.ppo.top_p=1.0."""
    from pipeline.config import RecipeError, load_recipe

    with pytest.raises(
        ValueError, match=r"ppo.top_p=0.9: PPO samples from the full distribution.*Fix: align.ppo.top_p=1.0"
    ):
        PPOConfig(top_p=0.9)
    with pytest.raises(RecipeError, match=r"align.top_p \(ppo's default\): ppo.top_p=0.9"):
        load_recipe("tiny-cpu", ["align.methods=[ppo]", "align.top_p=0.9"])
    with pytest.raises(RecipeError, match=r"align.ppo.top_p: ppo.top_p=0.5"):
        load_recipe("tiny-cpu", ["align.methods=[ppo]", "align.ppo={top_p: 0.5}"])
    assert load_recipe("tiny-cpu", ["align.methods=[ppo]", "align.top_p=0.9", "align.ppo={top_p: 1.0}"])
    assert load_recipe("tiny-cpu", ["align.methods=[rjs]", "align.top_p=0.9"]).align.top_p == 0.9
