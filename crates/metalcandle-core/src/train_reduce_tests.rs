//! Two workers summing through a reducer take the step one process takes on the whole batch.

use super::*;
use crate::optim::{Algorithm, OptimizerConfig};
use crate::testing::tiny_llama;
use candle_core::Device;
use std::sync::{Arc, Barrier, Mutex};

/// Rows `rows` of a fixed [4, 6] batch whose labels are masked unevenly (row 3 entirely), so
/// the workers hold different numbers of label tokens and one holds none in a micro-batch.
fn rows(step: usize, micro: usize, rows: std::ops::Range<usize>) -> Batch {
    let t = 6;
    let ids: Vec<u32> = (0..4 * t)
        .map(|i| ((i * 7 + step * 13 + micro * 5) % 48) as u32)
        .collect();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let masked = i / t == 3 || (i / t == 0 && i % t < 3);
            if masked {
                IGNORE_INDEX
            } else {
                x as i64
            }
        })
        .collect();
    let (a, b) = (rows.start * t, rows.end * t);
    Batch {
        ids: Tensor::from_vec(ids[a..b].to_vec(), (rows.len(), t), &Device::Cpu).unwrap(),
        labels: labels[a..b].to_vec(),
        attention_mask: None,
        pre_shifted: false,
    }
}

/// Sums in rank order through shared memory: the stand-in for an MPI all-reduce.
struct Shared {
    f32s: Mutex<Vec<Vec<f32>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

struct ThreadReducer {
    rank: usize,
    shared: Arc<Shared>,
    f32_calls: usize,
}

fn sum_in_rank_order<T: Copy + std::ops::Add<Output = T>>(
    rank: usize,
    slots: &Mutex<Vec<Vec<T>>>,
    barrier: &Barrier,
    values: &mut [T],
) {
    slots.lock().unwrap()[rank] = values.to_vec();
    barrier.wait();
    {
        let all = slots.lock().unwrap();
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().skip(1).fold(all[0][i], |acc, w| acc + w[i]);
        }
    }
    barrier.wait();
}

impl GradReducer for ThreadReducer {
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        sum_in_rank_order(self.rank, &self.shared.f64s, &self.shared.barrier, values);
        Ok(())
    }
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()> {
        self.f32_calls += 1;
        sum_in_rank_order(self.rank, &self.shared.f32s, &self.shared.barrier, values);
        Ok(())
    }
}

/// SGD with momentum: its update is linear in the gradient, so the weights differ by the
/// summation-order rounding alone (AdamW divides tiny gradients by their own size, ~1e-8 in
/// the masked rows here, which turns the same rounding into a visible difference).
fn optimizer() -> Optimizer {
    Optimizer::new(OptimizerConfig {
        algorithm: Algorithm::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        lr: 0.5,
        ..Default::default()
    })
    .unwrap()
}

fn weights(m: &Decoder) -> Vec<f32> {
    m.named_parameters()
        .iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

const STEPS: usize = 3;

#[test]
fn two_workers_take_the_single_process_step() {
    // One process: two micro-batches of the whole 4-row batch per step.
    let mut single = tiny_llama(5);
    let mut opt = optimizer();
    let mut expected = vec![];
    for s in 0..STEPS {
        let micro = [rows(s, 0, 0..4), rows(s, 1, 0..4)];
        expected.push(train_step(&mut single, &mut opt, &micro, Some(0.5)).unwrap());
    }

    // Two workers: rows 0..2 and 2..4 of each micro-batch.
    let shared = Arc::new(Shared {
        f32s: Mutex::new(vec![vec![]; 2]),
        f64s: Mutex::new(vec![vec![]; 2]),
        barrier: Barrier::new(2),
    });
    let workers: Vec<_> = (0..2)
        .map(|rank| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut m = tiny_llama(5);
                let mut opt = optimizer();
                let mut r = ThreadReducer {
                    rank,
                    shared,
                    f32_calls: 0,
                };
                let part = rank * 2..rank * 2 + 2;
                let stats: Vec<StepStats> = (0..STEPS)
                    .map(|s| {
                        let micro = [rows(s, 0, part.clone()), rows(s, 1, part.clone())];
                        let opts = StepOptions {
                            max_grad_norm: Some(0.5),
                            reducer: Some(&mut r),
                            ..Default::default()
                        };
                        train_step_with(&mut m, &mut opt, &micro, opts).unwrap()
                    })
                    .collect();
                (stats, weights(&m), r.f32_calls)
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let want = weights(&single);
    for (stats, w, f32_calls) in &results {
        assert_eq!(*f32_calls, STEPS, "one gradient all-reduce per step");
        for (got, exp) in stats.iter().zip(&expected) {
            assert_eq!(got.tokens, exp.tokens);
            assert!(
                rel(got.loss, exp.loss) < 1e-6,
                "{} vs {}",
                got.loss,
                exp.loss
            );
            assert!(
                rel(got.grad_norm, exp.grad_norm) < 1e-5,
                "{} vs {}",
                got.grad_norm,
                exp.grad_norm
            );
        }
        let diff = crate::testing::max_diff(w, &want);
        assert!(diff < 1e-6, "weights differ by {diff}");
        eprintln!("max weight difference {diff:e}");
    }
    // Every worker holds the same weights to the last bit: the update ran on equal inputs.
    assert_eq!(results[0].1, results[1].1);
}
