//! Finite-difference gradient checks for the custom ops (float64).

use crate::testing::rand_tensor;
use candle_core::{Device, Result, Tensor, Var};

/// Checks the autograd gradient of `sum(f(inputs) * r)` for a fixed random `r` against
/// central differences, for every element of every input.
pub fn check_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, tol: f64) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tracked).unwrap();
    let r = rand_tensor(y.dims(), 4242);
    let loss = |y: Tensor| {
        y.mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-6;
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("input {i} received no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for j in 0..base.len() {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[j] += delta;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_vec(p, inputs[i].shape(), &Device::Cpu).unwrap();
                loss(f(&args).unwrap())
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (num - g[j]).abs() <= tol * (1.0 + num.abs()),
                "input {i} element {j}: autograd {} vs finite difference {num}",
                g[j]
            );
        }
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
