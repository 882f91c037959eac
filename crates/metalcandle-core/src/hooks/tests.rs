//! Each hook kind changes what it should and nothing else.

use super::*;
use crate::model::{Decoder, ForwardOptions};
use crate::ops::gradcheck::max_abs_diff;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::testing::{self, lm_batch, tiny_llama};
use crate::train::{train_step, train_step_with, Batch, StepOptions};
use candle_core::Device;

fn batch() -> Batch {
    lm_batch(vec![3, 9, 27, 1, 44, 8, 15, 2, 30, 7, 19, 5], 2)
}

fn ids() -> Tensor {
    batch().ids
}

fn logits(m: &Decoder) -> Tensor {
    m.detached()
        .forward(&ids(), &ForwardOptions::default(), None)
        .unwrap()
        .0
}

/// A full capture hook at `point`: its id.
fn capture_at(m: &mut Decoder, point: &str) -> u64 {
    m.hooks
        .add_forward(point, ForwardAction::Capture { full: true })
}

/// What the full capture hook `id` at `point` took (the hooks forget every capture).
fn captured(m: &Decoder, id: u64, point: &str) -> Tensor {
    let Captured::Full(x) = m.hooks.take_captured().remove(&(id, point.into())).unwrap() else {
        panic!("full capture expected")
    };
    x
}

/// Losses of `steps` AdamW steps, and the final weights.
fn trajectory(m: &mut Decoder, steps: usize) -> (Vec<f64>, Vec<Vec<f32>>) {
    let config = OptimizerConfig {
        lr: 1e-2,
        ..Default::default()
    };
    testing::trajectory(m, config, steps, |m, opt| {
        // Hooked models always take the composed path; the unhooked reference must too
        // for a bit-for-bit comparison.
        let opts = StepOptions {
            max_grad_norm: Some(1.0),
            fused: false,
            ..Default::default()
        };
        train_step_with(m, opt, &[batch()], opts).unwrap().loss
    })
}

#[test]
fn identity_hooks_and_zero_weight_aux_leave_the_trajectory_bit_identical() {
    let want = trajectory(&mut tiny_llama(11), 3);
    let mut m = tiny_llama(11);
    m.hooks.add_forward("*", ForwardAction::Scale(1.0));
    m.hooks
        .add_forward("*", ForwardAction::Capture { full: false });
    m.hooks.add_forward(
        "layers.*.mlp_out",
        ForwardAction::Custom(Arc::new(|_, _| Ok(None))),
    );
    m.hooks.add_forward(
        "layers.0.attn_out",
        ForwardAction::Custom(Arc::new(|_, x| Ok(Some(x.copy()?)))),
    );
    m.hooks
        .add_backward("layers.1.residual", BackwardAction::Scale(1.0));
    m.hooks.add_aux(AuxLoss::ZLoss { weight: 0.0 });
    m.hooks.add_aux(AuxLoss::ActivationL2 {
        point: "layers.*.mlp_out".into(),
        weight: 0.0,
    });
    assert_eq!(trajectory(&mut m, 3), want);
}

#[test]
fn stop_gradient_zeroes_exactly_the_gradients_upstream_of_its_point() {
    let mut m = tiny_llama(11);
    m.hooks
        .add_backward("layers.0.residual", BackwardAction::StopGradient);
    let vars = m.make_trainable().unwrap();
    let (loss, _) = m.tracked(&vars).loss(&batch()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let upstream = name.starts_with("model.embed_tokens") || name.contains("layers.0.");
        let g = grads.get(v);
        if upstream {
            assert!(g.is_none(), "{name} has a gradient upstream of the stop");
        } else {
            let norm = g.expect(name).abs().unwrap().sum_all().unwrap();
            assert!(norm.to_scalar::<f32>().unwrap() > 0.0, "{name}");
        }
    }
}

#[test]
fn backward_scale_multiplies_every_upstream_gradient() {
    let grads_of = |m: &mut Decoder| {
        let vars = m.make_trainable().unwrap();
        let (loss, _) = m.tracked(&vars).loss(&batch()).unwrap();
        let store = loss.backward().unwrap();
        vars.iter()
            .map(|(_, v)| store.get(v).unwrap().clone())
            .collect::<Vec<_>>()
    };
    let base = grads_of(&mut tiny_llama(11));
    let mut m = tiny_llama(11);
    m.hooks.add_backward("logits", BackwardAction::Scale(2.0));
    for (a, b) in base.iter().zip(grads_of(&mut m)) {
        let want = a.affine(2.0, 0.0).unwrap();
        assert!(
            max_abs_diff(&want, &b)
                <= 1e-6 * (1.0 + max_abs_diff(&want, &want.zeros_like().unwrap()))
        );
    }
}

#[test]
fn zeroed_branches_leave_embedding_final_norm_and_head() {
    // With every attention and MLP output scaled by 0 the residual stream is the embedding,
    // so the logits are head(final_norm(embed(ids))), computed here by hand.
    let mut m = tiny_llama(11);
    m.hooks
        .add_forward("layers.*.attn_out", ForwardAction::Scale(0.0));
    m.hooks
        .add_forward("layers.*.mlp_out", ForwardAction::Scale(0.0));
    let want = m
        .logits(
            &m.final_norm
                .forward(&m.embed.forward(&ids()).unwrap())
                .unwrap(),
        )
        .unwrap();
    assert!(max_abs_diff(&logits(&m), &want) < 1e-6);
}

#[test]
fn ablating_every_head_equals_zeroing_the_attention_output() {
    // llama's o_proj has no bias: no heads in, nothing out.
    let mut a = tiny_llama(11);
    a.hooks.add_forward(
        "layers.1.attn_probs",
        ForwardAction::AblateHeads(vec![0, 1, 2, 3]),
    );
    let mut b = tiny_llama(11);
    b.hooks
        .add_forward("layers.1.attn_out", ForwardAction::Scale(0.0));
    assert!(max_abs_diff(&logits(&a), &logits(&b)) < 1e-6);
    let mut c = tiny_llama(11);
    c.hooks
        .add_forward("layers.1.attn_probs", ForwardAction::AblateHeads(vec![1]));
    assert!(max_abs_diff(&logits(&c), &logits(&tiny_llama(11))) > 1e-4);
}

#[test]
fn capture_matches_hidden_states_and_removal_detaches() {
    let mut m = tiny_llama(11);
    let id = capture_at(&mut m, "layers.0.residual");
    let opts = ForwardOptions {
        output_hidden_states: true,
        ..Default::default()
    };
    let (_, hidden) = m.forward(&ids(), &opts, None).unwrap();
    let c = captured(&m, id, "layers.0.residual");
    assert_eq!(max_abs_diff(&c, &hidden[1]), 0.0);
    assert!(m.hooks.remove(id));
    assert!(!m.hooks.active());
    m.forward(&ids(), &opts, None).unwrap();
    assert!(m.hooks.take_captured().is_empty());
}

#[test]
fn patching_an_activation_reproduces_the_run_it_came_from() {
    // Patch run A's residual after block 0 into run B (other ids): B's last block then sees
    // A's stream, so B's logits become A's.
    let mut src = tiny_llama(11);
    let id = capture_at(&mut src, "layers.0.residual");
    let a_logits = logits(&src);
    let stored = captured(&src, id, "layers.0.residual");
    let mut m = tiny_llama(11);
    m.hooks
        .add_forward("layers.0.residual", ForwardAction::Patch(stored));
    let other = Tensor::from_vec(vec![1u32; 12], (2, 6), &Device::Cpu).unwrap();
    let (b_logits, _) = m.forward(&other, &Default::default(), None).unwrap();
    assert!(max_abs_diff(&a_logits, &b_logits) < 1e-6);
}

#[test]
fn aux_losses_have_their_closed_forms_and_are_reported_apart() {
    let mut m = tiny_llama(11);
    let id = capture_at(&mut m, "layers.0.mlp_out");
    m.hooks.add_aux(AuxLoss::ActivationL2 {
        point: "layers.0.mlp_out".into(),
        weight: 0.5,
    });
    m.hooks.add_aux(AuxLoss::AttentionEntropy {
        point: "layers.*.attn_probs".into(),
        weight: 0.0,
    });
    let parts = m.detached().loss_parts(&batch()).unwrap();
    let x = captured(&m, id, "layers.0.mlp_out");
    let want: f32 = x.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
    let got: f32 = parts.aux[0].2.to_scalar().unwrap();
    assert!((got - want).abs() < 1e-6 * want.max(1.0));
    // Entropy of a causal attention row over k keys lies in [0, ln k]; the first row has one key.
    let h: f32 = parts.aux[1].2.to_scalar().unwrap();
    assert!(h > 0.0 && h < (6f32).ln(), "{h}");
    let objective: f32 = parts.objective().unwrap().to_scalar().unwrap();
    let main: f32 = parts.main.to_scalar().unwrap();
    assert!((objective - (main + 0.5 * want)).abs() < 1e-5);
}

#[test]
fn update_hooks_freeze_and_transform_named_gradients() {
    let mut m = tiny_llama(11);
    let before = m.named_parameters();
    m.hooks
        .add_update("model.layers.0.*", GradTransform::Freeze);
    m.hooks.add_update("*", GradTransform::Sign);
    let mut opt = Optimizer::new(OptimizerConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    })
    .unwrap();
    train_step(&mut m, &mut opt, &[batch()], None).unwrap();
    let steps = opt.steps();
    for ((name, a), (_, b)) in before.iter().zip(m.named_parameters()) {
        let moved = max_abs_diff(a, &b);
        if name.starts_with("model.layers.0.") {
            assert_eq!(moved, 0.0, "{name} is frozen");
            assert!(!steps.contains_key(name));
        } else {
            // AdamW's first step on a sign gradient moves every entry by lr (where g != 0).
            assert!((moved - 1e-2).abs() < 1e-4, "{name}: {moved}");
        }
    }
}

#[test]
fn noise_is_reproducible_from_seed_and_step() {
    let run = || {
        let mut m = tiny_llama(11);
        m.hooks.add_forward(
            "layers.*.mlp_out",
            ForwardAction::Noise { std: 0.1, seed: 5 },
        );
        m.hooks
            .add_backward("embed", BackwardAction::Noise { std: 0.01, seed: 6 });
        trajectory(&mut m, 2)
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_ne!(a.0, trajectory(&mut tiny_llama(11), 2).0);
}

#[test]
fn bad_points_are_named() {
    let e = Hooks::check_point("layers.9.mlp_out", 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.9.mlp_out") && e.contains("N < 2"), "{e}");
    Hooks::check_point("layers.*.attn_probs", 2).unwrap();
}

#[test]
fn aux_inputs_are_kept_only_while_a_loss_is_computed() {
    let mut m = tiny_llama(11);
    m.hooks.add_aux(AuxLoss::ActivationL2 {
        point: "*".into(),
        weight: 1.0,
    });
    for _ in 0..3 {
        logits(&m);
    }
    assert!(m.hooks.take_collected().is_empty());
    m.detached().loss_parts(&batch()).unwrap();
    assert!(m.hooks.take_collected().is_empty());
}

#[test]
fn a_hook_error_inside_an_op_keeps_its_kind() {
    // attn_probs runs inside the attention op: the error crosses candle and must come back
    // as the input error it is, message intact, not as candle text.
    let mut m = tiny_llama(11);
    let wrong = candle_core::Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    m.hooks
        .add_forward("layers.0.attn_probs", ForwardAction::Patch(wrong));
    let err = m.forward(&ids(), &Default::default(), None).unwrap_err();
    assert!(
        matches!(&err, crate::Error::Input(msg) if msg.contains("layers.0.attn_probs")),
        "{err:?}"
    );
}
