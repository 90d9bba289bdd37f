"""GRPO, DAPO and CISPO on hand-computed tiny batches: values, gradients, aggregation, advantages."""

import math

import pytest
import torch

from stalwart.trainer.rl.losses import (
    LossSettings,
    aggregate,
    group_advantages,
    policy_loss,
    zero_variance_groups,
)

# Two sequences of two tokens; the second token of sequence 1 is padding.
RATIOS = torch.tensor([[1.0, 1.5], [0.5, 1.1]])
LOGPROBS = torch.tensor([[-0.5, -1.0], [-2.0, -0.3]])
MASK = torch.tensor([[True, True], [True, False]])
ADVANTAGES = torch.tensor([1.0, -1.0])
GROUPS = torch.tensor([0, 1])


def run_loss(settings):
    logprobs = LOGPROBS.clone().requires_grad_(True)
    generator_logprobs = LOGPROBS - RATIOS.log()
    output = policy_loss(logprobs, generator_logprobs, ADVANTAGES, MASK, GROUPS, settings)
    output.loss.backward()
    return output, logprobs.grad


def test_grpo_value_and_gradient_match_hand_computation():
    output, grad = run_loss(LossSettings(name="grpo", clip_eps=0.2))
    # seq0: tok0 min(1*1, 1*1) = 1; tok1 ratio 1.5 clipped to 1.2 -> 1.2. seq1: ratio 0.5, A=-1:
    # min(-0.5, -0.8) = -0.8. Sample mean: mean(-(1 + 1.2)/2, 0.8) = -0.15.
    assert output.loss.item() == pytest.approx(-0.15, abs=1e-6)
    # Only the unclipped token has a gradient: -rho*A * (1/2 tokens) * (1/2 sequences).
    expected = torch.tensor([[-0.25, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(grad, expected)
    assert output.metrics["clip_fraction"] == pytest.approx(2 / 3)


def test_dapo_asymmetric_clip_and_token_aggregation():
    output, grad = run_loss(LossSettings(name="dapo", clip_eps_low=0.2, clip_eps_high=0.28))
    # Token mean over 3 tokens: (-1 - 1.28 + 0.8) / 3.
    assert output.loss.item() == pytest.approx(-1.48 / 3, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, 0.0], [0.0, 0.0]]))


def test_dapo_clip_higher_keeps_gradient_where_grpo_clips():
    # ratio 1.25 with a positive advantage: outside GRPO's 1.2 but inside DAPO's 1.28.
    logprobs = torch.tensor([[-1.0]], requires_grad=True)
    generator = logprobs.detach() - math.log(1.25)
    args = (torch.tensor([1.0]), torch.tensor([[True]]), torch.tensor([0]))
    grpo = policy_loss(logprobs, generator, *args, LossSettings(name="grpo"))
    (grpo_grad,) = torch.autograd.grad(grpo.loss, logprobs)
    dapo = policy_loss(logprobs, generator, *args, LossSettings(name="dapo"))
    (dapo_grad,) = torch.autograd.grad(dapo.loss, logprobs)
    assert grpo_grad.item() == 0.0
    assert dapo_grad.item() == pytest.approx(-1.25)


def test_cispo_caps_the_weight_but_every_token_keeps_its_gradient():
    output, grad = run_loss(LossSettings(name="cispo", cispo_eps_max=1.2))
    # Loss = -sum sg(min(rho, 1.2)) * A * logp / 3 tokens.
    value = -(1.0 * 1.0 * -0.5 + 1.2 * 1.0 * -1.0 + 0.5 * -1.0 * -2.0) / 3
    assert output.loss.item() == pytest.approx(value, abs=1e-6)
    # The token with ratio 1.5 > cap keeps a gradient of size cap * A / 3.
    expected = torch.tensor([[-1.0 / 3, -1.2 / 3], [0.5 / 3, 0.0]])
    torch.testing.assert_close(grad, expected)
    assert grad[0, 1] != 0
    grpo_output, grpo_grad = run_loss(LossSettings(name="grpo"))
    assert grpo_grad[0, 1] == 0 and grpo_grad[1, 0] == 0


def test_cispo_gradient_flows_into_model_parameters_for_capped_tokens():
    # Through a real parameter: a token far above the cap still moves the weights.
    weight = torch.zeros(3, requires_grad=True)
    logprobs = torch.log_softmax(weight, dim=0)[None, :1]  # log p(token 0)
    generator = logprobs.detach() - math.log(10.0)  # ratio 10 >> cap 4
    args = (torch.tensor([1.0]), torch.tensor([[True]]), torch.tensor([0]))
    cispo = policy_loss(logprobs, generator, *args, LossSettings(name="cispo"))
    (cispo_grad,) = torch.autograd.grad(cispo.loss, weight)
    grpo = policy_loss(
        torch.log_softmax(weight, dim=0)[None, :1], generator, *args, LossSettings(name="grpo")
    )
    (grpo_grad,) = torch.autograd.grad(grpo.loss, weight)
    assert cispo_grad.abs().sum() > 0
    assert grpo_grad.abs().sum() == 0


def test_aggregation_modes_weigh_tokens_samples_and_prompts():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 0, 1])
    assert aggregate(per_token, mask, groups, "token").item() == pytest.approx(16 / 4)
    assert aggregate(per_token, mask, groups, "sample").item() == pytest.approx((1.5 + 3 + 10) / 3)
    assert aggregate(per_token, mask, groups, "prompt").item() == pytest.approx((6 / 3 + 10) / 2)
    with pytest.raises(ValueError, match="rl.aggregation"):
        aggregate(per_token, mask, groups, "sequence")


def test_group_and_batch_advantage_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(group_advantages(rewards, groups, "none"), centred)
    group_std = torch.tensor([math.sqrt(0.1875)] * 4 + [0.5] * 4)
    torch.testing.assert_close(
        group_advantages(rewards, groups, "group", eps=0.0), centred / group_std
    )
    batch_std = math.sqrt((0.75**2 + 3 * 0.25**2 + 4 * 0.25) / 8)
    torch.testing.assert_close(
        group_advantages(rewards, groups, "batch", eps=0.0), centred / batch_std
    )
    with pytest.raises(ValueError, match="rl.advantage_norm"):
        group_advantages(rewards, groups, "global")


def test_zero_variance_groups_are_flagged():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert zero_variance_groups(rewards, groups).tolist() == [True, True, False, False, True, True]
    advantages = group_advantages(rewards, groups, "group")
    assert advantages[[0, 1, 4, 5]].abs().max() == 0


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="rl.loss"):
        LossSettings(name="ppo")
    with pytest.raises(ValueError, match="rl.cispo_eps_max"):
        LossSettings(name="cispo", cispo_eps_max=0.0)
