//! The hook vocabulary, defined here once: the points, every built-in kind of each section, where
//! it applies, and its parameters with their types, defaults and bounds. The built-in actions are
//! made from parameters checked against it; the Python checks, the run config's `[hooks]` tables
//! and the README's list of kinds are derived from `vocabulary()`.

use super::{AuxLoss, BackwardAction, ForwardAction, GradTransform};
use crate::error::{Error, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};

/// The points before the blocks, inside each block `layers.N`, and after them, in the order a
/// forward reaches them.
pub const POINTS_BEFORE: [&str; 1] = ["embed"];
pub const POINTS_IN_A_LAYER: [&str; 6] = [
    "attn_in",
    "attn_scores",
    "attn_probs",
    "attn_out",
    "mlp_out",
    "residual",
];
pub const POINTS_AFTER: [&str; 2] = ["final_norm", "logits"];

/// The [batch, heads, T, keys] points, where kinds that act per head or per attention row sit.
const ATTENTION: &[&str] = &["attn_scores", "attn_probs"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Forward,
    Backward,
    Update,
    AuxLoss,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Forward,
        Section::Backward,
        Section::Update,
        Section::AuxLoss,
    ];

    /// The key of the section in a run config's `[hooks]` and in `vocabulary()`.
    pub fn key(self) -> &'static str {
        match self {
            Section::Forward => "forward",
            Section::Backward => "backward",
            Section::Update => "update",
            Section::AuxLoss => "aux_loss",
        }
    }

    /// The section's hooks in messages ("forward hook", "aux loss").
    pub fn label(self) -> &'static str {
        match self {
            Section::Forward => "forward hook",
            Section::Backward => "backward hook",
            Section::Update => "update hook",
            Section::AuxLoss => "aux loss",
        }
    }
}

/// Where a kind applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A point pattern, which must be given.
    Point,
    /// A point pattern, this one when none is given.
    PointOr(&'static str),
    /// No point: the kind reads the logits of the label positions.
    NoPoint,
    /// A pattern of parameter names, this one when none is given.
    Pattern(&'static str),
}

/// What a kind takes from its caller besides its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Takes {
    Params,
    /// A function from the caller's language.
    Function,
    /// An activation array of the point's shape.
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Type {
    Number,
    Int,
    Bool,
    /// A non-empty list of integers >= 0.
    Ints,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    Required,
    /// Optional, and left out when not given.
    Absent,
    Bool(bool),
    Int(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    AtLeast(f64),
    Above(f64),
}

#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub ty: Type,
    pub default: Default,
    pub min: Option<Bound>,
}

const fn required(name: &'static str, ty: Type, min: Option<Bound>) -> Param {
    Param {
        name,
        ty,
        default: Default::Required,
        min,
    }
}

const FACTOR: Param = required("factor", Type::Number, None);
const STD: Param = required("std", Type::Number, Some(Bound::AtLeast(0.0)));
const SEED: Param = Param {
    name: "seed",
    ty: Type::Int,
    default: Default::Int(0),
    min: Some(Bound::AtLeast(0.0)),
};
const MAX: Param = required("max", Type::Number, Some(Bound::Above(0.0)));
const WEIGHT: Param = required("weight", Type::Number, None);
const NOISE: &[Param] = &[STD, SEED];

/// Why a kind cannot be written in a run config.
const RUNS_A_FUNCTION: &str = "it runs a Python function; see Model.add_{section}_hook";

#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub section: Section,
    pub name: &'static str,
    pub target: Target,
    pub takes: Takes,
    pub params: &'static [Param],
    /// Two parameters that bound a range: at least one is given, and the first is <= the second.
    pub range: Option<(&'static str, &'static str)>,
    /// The points (their last part) the kind can sit at; empty: any.
    pub at: &'static [&'static str],
    /// Why the kind cannot be written in a run config, when it cannot (`{section}` is the
    /// section's key).
    pub python_only: Option<&'static str>,
}

const fn kind(section: Section, name: &'static str, params: &'static [Param]) -> Kind {
    Kind {
        section,
        name,
        target: match section {
            Section::Update => Target::Pattern("*"),
            _ => Target::Point,
        },
        takes: Takes::Params,
        params,
        range: None,
        at: &[],
        python_only: None,
    }
}

const fn function(section: Section) -> Kind {
    Kind {
        takes: Takes::Function,
        python_only: Some(RUNS_A_FUNCTION),
        ..kind(section, "python", &[])
    }
}

use Section::{AuxLoss as A, Backward as B, Forward as F, Update as U};

/// Every kind, by section, in the order messages and documents list them.
pub const KINDS: &[Kind] = &[
    Kind {
        python_only: Some(
            "a training run never reads what it captures; use model.capture(...) from Python",
        ),
        ..kind(
            F,
            "capture",
            &[Param {
                name: "full",
                ty: Type::Bool,
                default: Default::Bool(true),
                min: None,
            }],
        )
    },
    kind(F, "scale", &[FACTOR]),
    kind(F, "noise", NOISE),
    Kind {
        range: Some(("min", "max")),
        ..kind(
            F,
            "clamp",
            &[
                Param {
                    name: "min",
                    ty: Type::Number,
                    default: Default::Absent,
                    min: None,
                },
                Param {
                    name: "max",
                    ty: Type::Number,
                    default: Default::Absent,
                    min: None,
                },
            ],
        )
    },
    Kind {
        at: ATTENTION,
        ..kind(F, "ablate_heads", &[required("heads", Type::Ints, None)])
    },
    Kind {
        takes: Takes::Array,
        python_only: Some("it needs the activation array to patch in; see Model.add_forward_hook"),
        ..kind(F, "patch", &[])
    },
    function(F),
    kind(B, "scale", &[FACTOR]),
    kind(B, "clip_value", &[MAX]),
    kind(B, "clip_norm", &[MAX]),
    kind(B, "stop_gradient", &[]),
    kind(B, "straight_through", &[]),
    kind(B, "noise", NOISE),
    function(B),
    kind(U, "clip_value", &[MAX]),
    kind(U, "clip_norm", &[MAX]),
    kind(U, "noise", NOISE),
    kind(U, "sign", &[]),
    kind(U, "normalize", &[]),
    kind(U, "centralize", &[]),
    kind(U, "freeze", &[]),
    function(U),
    kind(A, "activation_l2", &[WEIGHT]),
    Kind {
        target: Target::NoPoint,
        ..kind(A, "z_loss", &[WEIGHT])
    },
    Kind {
        target: Target::PointOr("layers.*.attn_probs"),
        at: &["attn_probs"],
        ..kind(A, "attention_entropy", &[WEIGHT])
    },
];

/// The kinds of `section`, in order.
pub fn kinds(section: Section) -> impl Iterator<Item = &'static Kind> {
    KINDS.iter().filter(move |k| k.section == section)
}

/// The kind `name` of `section`; an error naming it and the section's kinds if there is none.
pub fn find(section: Section, name: &str) -> Result<&'static Kind> {
    kinds(section).find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<&str> = kinds(section).map(|k| k.name).collect();
        Error::Input(format!(
            "unknown {} kind \"{name}\" (expected one of: {})",
            section.label(),
            known.join(", ")
        ))
    })
}

/// Parameters checked against their kind, with its defaults filled in.
#[derive(Debug, Clone)]
pub struct Params {
    kind: &'static Kind,
    values: Map<String, Value>,
}

impl Params {
    /// Checks `given` (a JSON object; null is none) against `kind`'s parameters: each is known, of
    /// its type and within its bounds, the required ones are there; the defaults are filled in.
    pub fn check(kind: &'static Kind, given: &Value) -> Result<Params> {
        let label = format!("{} \"{}\"", kind.section.label(), kind.name);
        let empty = Map::new();
        let given = match given {
            Value::Null => &empty,
            Value::Object(m) => m,
            other => {
                return Err(Error::Input(format!(
                    "{label}: parameters must be an object, got {other}"
                )))
            }
        };
        let takes = || {
            let names: Vec<&str> = kind.params.iter().map(|p| p.name).collect();
            if names.is_empty() {
                "no parameters".to_string()
            } else {
                names.join(", ")
            }
        };
        if let Some(key) = given
            .keys()
            .find(|k| !kind.params.iter().any(|p| p.name == *k))
        {
            return Err(Error::Input(format!(
                "{label}: unknown parameter `{key}` (it takes {})",
                takes()
            )));
        }
        let mut values = Map::new();
        for p in kind.params {
            let value = match (given.get(p.name), p.default) {
                (Some(v), _) => check_value(&label, p, v)?,
                (None, Default::Required) => {
                    return Err(Error::Input(format!(
                        "{label}: needs `{}` (it takes {})",
                        p.name,
                        takes()
                    )))
                }
                (None, Default::Absent) => continue,
                (None, Default::Bool(b)) => Value::Bool(b),
                (None, Default::Int(i)) => Value::from(i),
            };
            values.insert(p.name.into(), value);
        }
        if let Some((lo, hi)) = kind.range {
            match (
                values.get(lo).and_then(Value::as_f64),
                values.get(hi).and_then(Value::as_f64),
            ) {
                (None, None) => {
                    return Err(Error::Input(format!(
                        "{label}: needs `{lo}`, `{hi}` or both"
                    )))
                }
                (Some(a), Some(b)) if a > b => {
                    return Err(Error::Input(format!(
                        "{label}: `{lo}` ({a}) must be <= `{hi}` ({b})"
                    )))
                }
                _ => {}
            }
        }
        Ok(Params { kind, values })
    }

    /// The kind `name` of `section` (`find`) with `given` checked against it (`check`).
    pub fn of(section: Section, name: &str, given: &Value) -> Result<Params> {
        Params::check(find(section, name)?, given)
    }

    fn get(&self, name: &str) -> Result<Option<&Value>> {
        if !self.kind.params.iter().any(|p| p.name == name) {
            return Err(Error::Msg(format!(
                "{} \"{}\" has no parameter `{name}`",
                self.kind.section.label(),
                self.kind.name
            )));
        }
        Ok(self.values.get(name))
    }

    fn number(&self, name: &str) -> Result<Option<f64>> {
        Ok(self.get(name)?.and_then(Value::as_f64))
    }

    fn num(&self, name: &str) -> Result<f64> {
        self.number(name)?
            .ok_or_else(|| Error::Msg(format!("parameter `{name}` not filled in")))
    }

    fn uint(&self, name: &str) -> Result<u64> {
        self.get(name)?
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Msg(format!("parameter `{name}` not filled in")))
    }

    fn flag(&self, name: &str) -> Result<bool> {
        self.get(name)?
            .and_then(Value::as_bool)
            .ok_or_else(|| Error::Msg(format!("parameter `{name}` not filled in")))
    }

    fn indices(&self, name: &str) -> Result<Vec<usize>> {
        let list = self.get(name)?.and_then(Value::as_array);
        Ok(list
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_u64())
                    .map(|h| h as usize)
                    .collect()
            })
            .unwrap_or_default())
    }
}

fn check_value(label: &str, p: &Param, v: &Value) -> Result<Value> {
    let bad =
        |expected: &str| Error::Input(format!("{label}: `{}` must be {expected}, got {v}", p.name));
    let n = match p.ty {
        Type::Bool => {
            return v
                .as_bool()
                .map(Value::Bool)
                .ok_or_else(|| bad("true or false"))
        }
        Type::Ints => {
            let ok = v
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(|h| h.as_u64().is_some()));
            return if ok {
                Ok(v.clone())
            } else {
                Err(bad("a non-empty list of integers >= 0"))
            };
        }
        Type::Int => v
            .as_i64()
            .map(|i| i as f64)
            .or_else(|| v.as_u64().map(|u| u as f64))
            .ok_or_else(|| bad("an integer"))?,
        Type::Number => v.as_f64().ok_or_else(|| bad("a number"))?,
    };
    let what = if p.ty == Type::Int {
        "an integer"
    } else {
        "a number"
    };
    match p.min {
        Some(Bound::AtLeast(m)) if n < m => return Err(bad(&format!("{what} >= {m}"))),
        Some(Bound::Above(m)) if n <= m => return Err(bad(&format!("{what} > {m}"))),
        _ => {}
    }
    Ok(v.clone())
}

fn needs(kind: &Kind) -> Error {
    Error::Input(match kind.takes {
        Takes::Function => format!(
            "{} \"{}\" needs a function, from the calling language",
            kind.section.label(),
            kind.name
        ),
        _ => format!(
            "{} \"{}\" needs the activation array to patch in",
            kind.section.label(),
            kind.name
        ),
    })
}

impl ForwardAction {
    /// The built-in forward action `kind` with JSON `params`; "patch" takes its `array`.
    pub fn built_in(kind: &str, params: &Value, array: Option<Tensor>) -> Result<ForwardAction> {
        let p = Params::of(Section::Forward, kind, params)?;
        let k = p.kind;
        Ok(match k.name {
            "capture" => ForwardAction::Capture {
                full: p.flag("full")?,
            },
            "scale" => ForwardAction::Scale(p.num("factor")?),
            "noise" => ForwardAction::Noise {
                std: p.num("std")?,
                seed: p.uint("seed")?,
            },
            "clamp" => ForwardAction::Clamp {
                min: p.number("min")?.unwrap_or(f64::MIN),
                max: p.number("max")?.unwrap_or(f64::MAX),
            },
            "ablate_heads" => ForwardAction::AblateHeads(p.indices("heads")?),
            "patch" => ForwardAction::Patch(array.ok_or_else(|| needs(k))?),
            _ => return Err(needs(k)),
        })
    }
}

impl BackwardAction {
    /// The built-in backward action `kind` with JSON `params`.
    pub fn built_in(kind: &str, params: &Value) -> Result<BackwardAction> {
        let p = Params::of(Section::Backward, kind, params)?;
        let k = p.kind;
        Ok(match k.name {
            "scale" => BackwardAction::Scale(p.num("factor")?),
            "clip_value" => BackwardAction::ClipValue(p.num("max")?),
            "clip_norm" => BackwardAction::ClipNorm(p.num("max")?),
            "stop_gradient" => BackwardAction::StopGradient,
            "straight_through" => BackwardAction::StraightThrough,
            "noise" => BackwardAction::Noise {
                std: p.num("std")?,
                seed: p.uint("seed")?,
            },
            _ => return Err(needs(k)),
        })
    }
}

impl GradTransform {
    /// The built-in update transform `kind` with JSON `params`.
    pub fn built_in(kind: &str, params: &Value) -> Result<GradTransform> {
        let p = Params::of(Section::Update, kind, params)?;
        let k = p.kind;
        Ok(match k.name {
            "clip_value" => GradTransform::ClipValue(p.num("max")?),
            "clip_norm" => GradTransform::ClipNorm(p.num("max")?),
            "noise" => GradTransform::Noise {
                std: p.num("std")?,
                seed: p.uint("seed")?,
            },
            "sign" => GradTransform::Sign,
            "normalize" => GradTransform::Normalize,
            "centralize" => GradTransform::Centralize,
            "freeze" => GradTransform::Freeze,
            _ => return Err(needs(k)),
        })
    }
}

impl AuxLoss {
    /// The auxiliary loss `kind` of `weight` at `point` (its default point when None).
    pub fn built_in(kind: &str, weight: f64, point: Option<String>) -> Result<AuxLoss> {
        let p = Params::of(Section::AuxLoss, kind, &json!({ "weight": weight }))?;
        let k = p.kind;
        let weight = p.num("weight")?;
        let label = format!("aux loss \"{kind}\"");
        let point = match (k.target, point) {
            (Target::NoPoint, Some(_)) => {
                return Err(Error::Input(format!(
                    "{label} takes no point (it is computed on the logits)"
                )))
            }
            (Target::Point, None) => return Err(Error::Input(format!("{label} needs a `point`"))),
            (Target::PointOr(default), None) => default.to_string(),
            (_, p) => p.unwrap_or_default(),
        };
        Ok(match k.name {
            "activation_l2" => AuxLoss::ActivationL2 { point, weight },
            "z_loss" => AuxLoss::ZLoss { weight },
            "attention_entropy" => AuxLoss::AttentionEntropy { point, weight },
            _ => return Err(needs(k)),
        })
    }
}

fn param_json(p: &Param) -> Value {
    let ty = match p.ty {
        Type::Number => "number",
        Type::Int => "int",
        Type::Bool => "bool",
        Type::Ints => "ints",
    };
    let default = match p.default {
        Default::Required | Default::Absent => Value::Null,
        Default::Bool(b) => Value::Bool(b),
        Default::Int(i) => Value::from(i),
    };
    let (min, min_exclusive) = match p.min {
        None => (Value::Null, false),
        Some(Bound::AtLeast(m)) => (json!(m), false),
        Some(Bound::Above(m)) => (json!(m), true),
    };
    json!({
        "name": p.name,
        "type": ty,
        "required": p.default == Default::Required,
        "default": default,
        "min": min,
        "min_exclusive": min_exclusive,
    })
}

fn kind_json(k: &Kind) -> Value {
    let (target, default) = match k.target {
        Target::Point => (json!("point"), Value::Null),
        Target::PointOr(d) => (json!("point"), json!(d)),
        Target::NoPoint => (Value::Null, Value::Null),
        Target::Pattern(d) => (json!("pattern"), json!(d)),
    };
    let params: Vec<Value> = k.params.iter().map(param_json).collect();
    json!({
        "name": k.name,
        "target": target,
        "target_default": default,
        "takes": match k.takes {
            Takes::Params => "params",
            Takes::Function => "function",
            Takes::Array => "array",
        },
        "params": params,
        "range": k.range.map(|(a, b)| vec![a, b]),
        "at": k.at,
        "python_only": k.python_only,
    })
}

/// The whole vocabulary as plain data, every list in order: `points` (`before`, `in_a_layer`,
/// `after`), and `sections`, each with its `key`, `label` and `kinds`: a kind's `name`, where it
/// applies (`target`: "point", "pattern" or null, and `target_default`), what it `takes` ("params",
/// "function", "array"), its `params` (`name`, `type`, `required`, `default`, `min`,
/// `min_exclusive`), an optional `range` pair, the points it can sit `at`, and why it is
/// `python_only` (null when a run config may name it).
pub fn vocabulary() -> Value {
    let sections: Vec<Value> = Section::ALL
        .iter()
        .map(|&s| {
            let kinds: Vec<Value> = kinds(s).map(kind_json).collect();
            json!({ "key": s.key(), "label": s.label(), "kinds": kinds })
        })
        .collect();
    json!({
        "points": {
            "before": POINTS_BEFORE,
            "in_a_layer": POINTS_IN_A_LAYER,
            "after": POINTS_AFTER,
        },
        "sections": sections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A value of each parameter's type, within its bounds.
    fn sample(k: &Kind) -> Value {
        let m: Map<String, Value> = k
            .params
            .iter()
            .map(|p| {
                let v = match p.ty {
                    Type::Number => json!(2.5),
                    Type::Int => json!(3),
                    Type::Bool => json!(false),
                    Type::Ints => json!([1]),
                };
                (p.name.to_string(), v)
            })
            .collect();
        Value::Object(m)
    }

    fn built(k: &'static Kind, params: &Value) -> Result<String> {
        let array = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
        Ok(match k.section {
            Section::Forward => format!(
                "{:?}",
                ForwardAction::built_in(k.name, params, Some(array))?
            ),
            Section::Backward => format!("{:?}", BackwardAction::built_in(k.name, params)?),
            Section::Update => format!("{:?}", GradTransform::built_in(k.name, params)?),
            Section::AuxLoss => {
                let point = match k.target {
                    Target::NoPoint => None,
                    _ => Some("embed".to_string()),
                };
                format!("{:?}", AuxLoss::built_in(k.name, 2.5, point)?)
            }
        })
    }

    #[test]
    fn every_kind_but_the_functions_is_built_from_its_parameters() {
        // A builder reading a parameter its kind does not declare, or a kind without a builder,
        // fails here.
        let mut names = Vec::new();
        for k in KINDS {
            let got = built(k, &sample(k));
            if k.takes == Takes::Function {
                let e = got.unwrap_err().to_string();
                assert!(e.contains("needs a function"), "{}: {e}", k.name);
            } else {
                names.push(got.unwrap_or_else(|e| panic!("{}: {e}", k.name)));
            }
        }
        let want = [
            "Capture { full: false }",
            "Scale(2.5)",
            "Noise(2.5, 3)",
            "Clamp(2.5, 2.5)",
            "AblateHeads([1])",
            "Patch([2])",
            "Scale(2.5)",
            "ClipValue(2.5)",
            "ClipNorm(2.5)",
            "StopGradient",
            "StraightThrough",
            "Noise(2.5, 3)",
            "ClipValue(2.5)",
            "ClipNorm(2.5)",
            "Noise(2.5, 3)",
            "Sign",
            "Normalize",
            "Centralize",
            "Freeze",
            "ActivationL2 { point: \"embed\", weight: 2.5 }",
            "ZLoss { weight: 2.5 }",
            "AttentionEntropy { point: \"embed\", weight: 2.5 }",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn defaults_are_filled_in_and_optional_ones_left_out() {
        let a = ForwardAction::built_in("noise", &json!({"std": 0.5}), None).unwrap();
        assert_eq!(format!("{a:?}"), "Noise(0.5, 0)");
        let a = ForwardAction::built_in("capture", &Value::Null, None).unwrap();
        assert_eq!(format!("{a:?}"), "Capture { full: true }");
        let a = ForwardAction::built_in("clamp", &json!({"max": 1}), None).unwrap();
        assert_eq!(format!("{a:?}"), format!("Clamp({}, 1)", f64::MIN));
        let a = AuxLoss::built_in("attention_entropy", 0.1, None).unwrap();
        assert_eq!(a.point(), Some("layers.*.attn_probs"));
    }

    #[test]
    fn bad_kinds_and_parameters_name_the_key_and_what_is_allowed() {
        let err = |r: Result<String>| r.unwrap_err().to_string();
        let fwd = |kind: &str, p: Value| {
            ForwardAction::built_in(kind, &p, None).map(|a| format!("{a:?}"))
        };
        let upd =
            |kind: &str, p: Value| GradTransform::built_in(kind, &p).map(|a| format!("{a:?}"));
        let cases = [
            (
                fwd("scal", json!({})),
                "unknown forward hook kind \"scal\" (expected one of: capture, scale, noise, \
                 clamp, ablate_heads, patch, python)",
            ),
            (
                upd("frezee", json!({})),
                "unknown update hook kind \"frezee\" (expected one of: clip_value, clip_norm, \
                 noise, sign, normalize, centralize, freeze, python)",
            ),
            (
                fwd("scale", json!({"facter": 2})),
                "forward hook \"scale\": unknown parameter `facter` (it takes factor)",
            ),
            (
                upd("sign", json!({"max": 2})),
                "update hook \"sign\": unknown parameter `max` (it takes no parameters)",
            ),
            (
                fwd("noise", json!({"seed": 1})),
                "forward hook \"noise\": needs `std` (it takes std, seed)",
            ),
            (
                fwd("noise", json!({"std": -1})),
                "forward hook \"noise\": `std` must be a number >= 0, got -1",
            ),
            (
                fwd("noise", json!({"std": 1, "seed": 1.5})),
                "forward hook \"noise\": `seed` must be an integer, got 1.5",
            ),
            (
                upd("clip_norm", json!({"max": 0})),
                "update hook \"clip_norm\": `max` must be a number > 0, got 0",
            ),
            (
                fwd("ablate_heads", json!({"heads": []})),
                "forward hook \"ablate_heads\": `heads` must be a non-empty list of integers >= 0, got []",
            ),
            (
                fwd("capture", json!({"full": 1})),
                "forward hook \"capture\": `full` must be true or false, got 1",
            ),
            (
                fwd("clamp", json!({})),
                "forward hook \"clamp\": needs `min`, `max` or both",
            ),
            (
                fwd("clamp", json!({"min": 2, "max": 1})),
                "forward hook \"clamp\": `min` (2) must be <= `max` (1)",
            ),
            (
                fwd("patch", json!({})),
                "forward hook \"patch\" needs the activation array to patch in",
            ),
            (
                fwd("scale", json!([2])),
                "forward hook \"scale\": parameters must be an object, got [2]",
            ),
            (
                AuxLoss::built_in("z_loss", 1.0, Some("logits".into())).map(|a| format!("{a:?}")),
                "aux loss \"z_loss\" takes no point (it is computed on the logits)",
            ),
            (
                AuxLoss::built_in("activation_l2", 1.0, None).map(|a| format!("{a:?}")),
                "aux loss \"activation_l2\" needs a `point`",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(err(got), want);
        }
    }

    #[test]
    fn the_vocabulary_lists_every_kind_and_point_in_order() {
        let v = vocabulary();
        let sections: Vec<&str> = v["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap())
            .collect();
        assert_eq!(sections, ["forward", "backward", "update", "aux_loss"]);
        let n: usize = v["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kinds"].as_array().unwrap().len())
            .sum();
        assert_eq!(n, KINDS.len());
        let noise = &v["sections"][0]["kinds"][2];
        assert_eq!(noise["name"], "noise");
        assert_eq!(
            noise["params"],
            json!([
                {"name": "std", "type": "number", "required": true, "default": null, "min": 0.0,
                 "min_exclusive": false},
                {"name": "seed", "type": "int", "required": false, "default": 0, "min": 0.0,
                 "min_exclusive": false},
            ])
        );
        assert_eq!(v["sections"][3]["kinds"][1]["target"], Value::Null);
        let names = super::super::point_names(1);
        let listed: Vec<String> = v["points"]["before"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .chain(
                v["points"]["in_a_layer"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| format!("layers.0.{}", p.as_str().unwrap())),
            )
            .chain(
                v["points"]["after"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().to_string()),
            )
            .collect();
        assert_eq!(names, listed);
    }
}
