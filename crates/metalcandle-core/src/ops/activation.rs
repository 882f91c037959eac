//! Activations. GELU in its exact (erf) and tanh-approximated forms, with backward.

use super::{
    by_dtype, cpu_tensor, dispatch_float, par_fill, slice, use_cpu_kernel, with_slices, Elem,
};
use crate::spec::Activation;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

#[derive(Clone, Copy)]
struct Gelu {
    tanh: bool,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

fn erf<T: Elem>(x: T) -> T {
    <T as num_traits::NumCast>::from(candle_core::cpu::erf::erf_f64(
        num_traits::ToPrimitive::to_f64(&x).unwrap(),
    ))
    .unwrap()
}

pub(crate) fn value<T: Elem>(x: T, tanh: bool) -> T {
    let half = T::from(0.5).unwrap();
    if tanh {
        let inner = T::from(SQRT_2_OVER_PI).unwrap() * (x + T::from(0.044715).unwrap() * x * x * x);
        half * x * (T::one() + inner.tanh())
    } else {
        half * x * (T::one() + erf(x * T::from(FRAC_1_SQRT_2).unwrap()))
    }
}

pub(crate) fn derivative<T: Elem>(x: T, tanh: bool) -> T {
    let half = T::from(0.5).unwrap();
    if tanh {
        let c = T::from(SQRT_2_OVER_PI).unwrap();
        let a = T::from(0.044715).unwrap();
        let th = (c * (x + a * x * x * x)).tanh();
        half * (T::one() + th)
            + half * x * (T::one() - th * th) * c * (T::one() + T::from(3.0).unwrap() * a * x * x)
    } else {
        let pdf =
            (-(x * x) * half).exp() * T::from(1.0 / (2.0 * std::f64::consts::PI).sqrt()).unwrap();
        half * (T::one() + erf(x * T::from(FRAC_1_SQRT_2).unwrap())) + x * pdf
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(s, "gelu", |s: T| {
            let x: &[T] = slice(s, l)?;
            let out = par_fill(x.len(), |at, out| {
                for (o, &x) in out.iter_mut().zip(&x[at..]) {
                    *o = value(x, self.tanh);
                }
            });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let dx = by_dtype!(x.dtype(), "gelu", |T| with_slices::<T, _>(&[x, &g], |s| {
            let (x_, g_): (&[T], &[T]) = (s[0], s[1]);
            let dx = par_fill(x_.len(), |at, out| {
                for ((o, &x), &g) in out.iter_mut().zip(&x_[at..]).zip(&g_[at..]) {
                    *o = g * derivative(x, self.tanh);
                }
            });
            cpu_tensor(dx, x.shape())
        })?);
        Ok(Some(dx))
    }
}

/// Applies an MLP activation: GELU (both forms) through our kernel, SiLU and ReLU through candle
/// (whose unary ops carry a backward).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
        Activation::GeluTanh | Activation::Gelu => {
            let tanh = act == Activation::GeluTanh;
            if use_cpu_kernel(x) {
                x.contiguous()?.apply_op1(Gelu { tanh })
            } else if tanh {
                x.gelu()
            } else {
                x.gelu_erf()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_closed_forms() {
        let x = (rand_tensor(&[3, 50], 1) * 4.0).unwrap();
        let d = max_abs_diff(
            &activation(&x, Activation::GeluTanh).unwrap(),
            &x.gelu().unwrap(),
        );
        assert!(d < 1e-12, "{d}");
        let d = max_abs_diff(
            &activation(&x, Activation::Gelu).unwrap(),
            &x.gelu_erf().unwrap(),
        );
        assert!(d < 1e-12, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for act in [Activation::Gelu, Activation::GeluTanh] {
            check_grads(
                &[(rand_tensor(&[2, 9], 2) * 3.0).unwrap()],
                |a| activation(&a[0], act),
                1e-6,
            );
        }
    }
}
