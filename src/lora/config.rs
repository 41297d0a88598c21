//! `LoraConfig` with PEFT's field names and semantics, and the selection of target modules.

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::{json, Map, Value};

/// PEFT's `target_modules`: a list of names matched as suffixes, a regular expression matched
/// against the whole module name, or "all-linear".
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
    AllLinear,
}

impl TargetModules {
    /// Parses the CLI form: "all-linear", a comma-separated list, or `re:PATTERN`.
    pub fn parse(s: &str) -> Self {
        if s == "all-linear" {
            TargetModules::AllLinear
        } else if let Some(p) = s.strip_prefix("re:") {
            TargetModules::Regex(p.to_string())
        } else {
            TargetModules::Names(s.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect())
        }
    }

    fn from_json(v: &Value, field: &str) -> Result<Option<Self>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s == "all-linear" => Some(TargetModules::AllLinear),
            Value::String(s) => Some(TargetModules::Regex(s.clone())),
            Value::Array(a) => Some(TargetModules::Names(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string).with_context(|| format!("{field}: expected strings")))
                    .collect::<Result<_>>()?,
            )),
            _ => bail!("{field}: expected a string or a list of strings"),
        })
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
            TargetModules::AllLinear => json!("all-linear"),
        }
    }
}

/// A compiled matcher over full module names (`model.layers.0.self_attn.q_proj`).
enum Matcher {
    Names(Vec<String>),
    Regex(Regex),
    All,
}

impl Matcher {
    fn new(t: &TargetModules) -> Result<Self> {
        Ok(match t {
            TargetModules::Names(n) => Matcher::Names(n.clone()),
            TargetModules::Regex(r) => {
                Matcher::Regex(Regex::new(&format!("^(?:{r})$")).with_context(|| format!("invalid target_modules regex {r:?}"))?)
            }
            TargetModules::AllLinear => Matcher::All,
        })
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Matcher::Names(n) => n.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Matcher::Regex(r) => r.is_match(name),
            Matcher::All => true,
        }
    }
}

/// A LoRA configuration, field for field as PEFT's `LoraConfig` (the subset lowrank implements;
/// features it does not implement are refused when reading a PEFT config).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    /// (pattern, rank) in the order given; the first pattern that matches a module wins.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f32)>,
    pub task_type: String,
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            use_rslora: false,
            layers_to_transform: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: None,
        }
    }
}

/// One module chosen by a config, with its resolved rank, alpha and scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Selected {
    pub name: String,
    pub r: usize,
    pub alpha: f32,
    pub scale: f32,
}

/// PEFT's `get_pattern_key`: the first pattern `p` with `^(.*\.)?(p)$` matching the name.
fn pattern_value<T: Copy>(patterns: &[(String, T)], name: &str) -> Result<Option<T>> {
    for (p, v) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).with_context(|| format!("invalid pattern {p:?}"))?;
        if re.is_match(name) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// The layer index in a module name (PEFT's default `layers_pattern`: the number after a
/// component such as `layers`).
fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).rev().find_map(|w| if w[0] == "layers" || w[0] == "h" { w[1].parse().ok() } else { None })
}

fn json_number(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

impl LoraConfig {
    pub fn scale_for(&self, r: usize, alpha: f32) -> f32 {
        if self.use_rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        }
    }

    /// Chooses the adapted modules among `candidates` (full names of the model's linear
    /// modules), with PEFT's matching rules. Every entry of a `target_modules` list must match
    /// something, so a typo is an error rather than a silently smaller adapter.
    pub fn select(&self, candidates: &[String]) -> Result<Vec<Selected>> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        crate::limits::check("lora_dropout", self.lora_dropout as f64, crate::limits::Allowed::RightOpen(0.0, 1.0))?;
        if !self.lora_alpha.is_finite() || self.alpha_pattern.iter().any(|(_, a)| !a.is_finite()) {
            bail!("lora_alpha and alpha_pattern values must be finite numbers");
        }
        let short_names = || {
            let mut s: Vec<&str> = candidates.iter().filter_map(|c| c.rsplit('.').next()).collect();
            s.sort();
            s.dedup();
            s.join(", ")
        };
        if let TargetModules::Names(names) = &self.target_modules {
            if names.is_empty() {
                bail!("target_modules is empty");
            }
            for t in names {
                if !candidates.iter().any(|c| c == t || c.ends_with(&format!(".{t}"))) {
                    bail!("target module \"{t}\" matches no linear module of this model (its modules: {})", short_names());
                }
            }
        }
        let target = Matcher::new(&self.target_modules)?;
        let exclude = self.exclude_modules.as_ref().map(Matcher::new).transpose()?;
        let mut out = Vec::new();
        for name in candidates {
            if !target.matches(name) || exclude.as_ref().is_some_and(|e| e.matches(name)) {
                continue;
            }
            if let Some(layers) = &self.layers_to_transform {
                match layer_index(name) {
                    Some(i) if layers.contains(&i) => {}
                    _ => continue,
                }
            }
            let r = pattern_value(&self.rank_pattern, name)?.unwrap_or(self.r);
            let alpha = pattern_value(&self.alpha_pattern, name)?.unwrap_or(self.lora_alpha);
            if r == 0 {
                bail!("rank_pattern gives rank 0 to {name}");
            }
            out.push(Selected { name: name.clone(), r, alpha, scale: self.scale_for(r, alpha) });
        }
        if out.is_empty() {
            bail!("target_modules {} selects no module of this model (its modules: {})", self.target_modules.to_json(), short_names());
        }
        Ok(out)
    }

    /// Reads a PEFT `adapter_config.json` value. Unknown keys are ignored; keys that ask for a
    /// feature lowrank does not implement are refused, naming the feature.
    pub fn from_peft_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().context("adapter_config.json: expected a JSON object")?;
        let get = |k: &str| obj.get(k).unwrap_or(&Value::Null);
        match get("peft_type").as_str() {
            Some("LORA") | None => {}
            Some(other) => {
                bail!("adapter_config.json: peft_type \"{other}\" is not supported (only LORA)")
            }
        }
        let truthy = |k: &str| match get(k) {
            Value::Null | Value::Bool(false) => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        };
        let unsupported: [(&str, &str); 11] = [
            ("use_dora", "DoRA (use_dora)"),
            ("modules_to_save", "modules_to_save (fully trained extra modules)"),
            ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights)"),
            ("lora_bias", "lora_bias"),
            ("layer_replication", "layer_replication"),
            ("use_qalora", "QALoRA (use_qalora)"),
            ("trainable_token_indices", "trainable_token_indices"),
            ("target_parameters", "target_parameters (LoRA on nn.Parameter)"),
            ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
            ("arrow_config", "Arrow routing (arrow_config)"),
            ("use_bdlora", "BD-LoRA (use_bdlora)"),
        ];
        for (key, feature) in unsupported {
            if truthy(key) {
                bail!("adapter uses {feature}, which lowrank does not support");
            }
        }
        match get("bias").as_str() {
            None | Some("none") => {}
            Some(b) => {
                bail!("adapter trains biases (bias=\"{b}\"), which lowrank does not support")
            }
        }
        match get("layers_pattern") {
            Value::Null => {}
            Value::String(s) if s == "layers" => {}
            Value::Array(a) if a.iter().all(|x| x.as_str() == Some("layers")) => {}
            other => bail!("layers_pattern {other} is not supported (only the default \"layers\")"),
        }
        // Every field is checked for its type: a wrong type is an error naming the field, never
        // a silent default (null counts as absent, as PEFT writes unset fields).
        let number = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                Value::Null => Ok(None),
                x => x.as_f64().map(Some).with_context(|| format!("adapter_config.json: \"{k}\" must be a number, found {x}")),
            }
        };
        let flag = |k: &str| -> Result<Option<bool>> {
            match get(k) {
                Value::Null => Ok(None),
                x => x.as_bool().map(Some).with_context(|| format!("adapter_config.json: \"{k}\" must be true or false, found {x}")),
            }
        };
        let text = |k: &str| -> Result<Option<String>> {
            match get(k) {
                Value::Null => Ok(None),
                x => x
                    .as_str()
                    .map(|t| Some(t.to_string()))
                    .with_context(|| format!("adapter_config.json: \"{k}\" must be a string, found {x}")),
            }
        };
        let rank = |what: &str, x: &Value| -> Result<usize> {
            match x.as_u64() {
                Some(r) if r >= 1 => Ok(usize::try_from(r).unwrap_or(usize::MAX)),
                _ => bail!("adapter_config.json: {what} must be an integer >= 1, found {x}"),
            }
        };
        let alpha = |what: &str, x: f64| -> Result<f32> {
            if !x.is_finite() || !(x as f32).is_finite() {
                bail!("adapter_config.json: {what} must be a finite number, found {x}");
            }
            Ok(x as f32)
        };
        let r = match get("r") {
            Value::Null => bail!("adapter_config.json: missing \"r\""),
            x => rank("\"r\"", x)?,
        };
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n.as_u64().context("layers_to_transform: expected a non-negative integer")? as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize).context("layers_to_transform: expected non-negative integers"))
                    .collect::<Result<_>>()?,
            ),
            _ => bail!("layers_to_transform: expected an integer or a list"),
        };
        let pattern = |k: &str| -> Result<Vec<(String, Value)>> {
            match get(k) {
                Value::Null => Ok(vec![]),
                Value::Object(m) => Ok(m.iter().map(|(p, x)| (p.clone(), x.clone())).collect()),
                x => bail!("adapter_config.json: \"{k}\" must be an object, found {x}"),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(p, x)| Ok((p.clone(), rank(&format!("rank_pattern[{p:?}]"), &x)?)))
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(p, x)| {
                let v = x.as_f64().with_context(|| format!("adapter_config.json: alpha_pattern[{p:?}] must be a number, found {x}"))?;
                Ok((p.clone(), alpha(&format!("alpha_pattern[{p:?}]"), v)?))
            })
            .collect::<Result<_>>()?;
        let lora_dropout = number("lora_dropout")?.unwrap_or(0.0);
        crate::limits::check("adapter_config.json: lora_dropout", lora_dropout, crate::limits::Allowed::RightOpen(0.0, 1.0))?;
        Ok(LoraConfig {
            r,
            lora_alpha: alpha("lora_alpha", number("lora_alpha")?.unwrap_or(8.0))?,
            lora_dropout: lora_dropout as f32,
            target_modules: TargetModules::from_json(get("target_modules"), "target_modules")?
                .context("adapter_config.json: missing \"target_modules\"")?,
            exclude_modules: TargetModules::from_json(get("exclude_modules"), "exclude_modules")?,
            use_rslora: flag("use_rslora")?.unwrap_or(false),
            layers_to_transform,
            rank_pattern,
            alpha_pattern,
            task_type: text("task_type")?.unwrap_or_else(|| "CAUSAL_LM".into()),
            base_model_name_or_path: text("base_model_name_or_path")?,
        })
    }

    /// The adapter_config.json PEFT writes for this configuration (same keys as PEFT 0.21 for the
    /// features used, with the unused ones at their defaults), so PEFT and vLLM load it unchanged.
    pub fn to_peft_json(&self) -> Value {
        let pat = |p: &[(String, Value)]| -> Value { Value::Object(p.iter().cloned().collect::<Map<String, Value>>()) };
        let ranks: Vec<(String, Value)> = self.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let alphas: Vec<(String, Value)> = self.alpha_pattern.iter().map(|(k, v)| (k.clone(), json_number(*v))).collect();
        json!({
            "alpha_pattern": pat(&alphas),
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": self.exclude_modules.as_ref().map(TargetModules::to_json),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": json_number(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": pat(&ranks),
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": self.task_type,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        let mut v = vec![];
        for l in 0..3 {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{l}.{m}"));
            }
        }
        v
    }

    #[test]
    fn peft_matching_rules() {
        let c = LoraConfig::default();
        let s = c.select(&names()).unwrap();
        assert_eq!(s.len(), 6);
        assert!(s.iter().all(|m| m.scale == 1.0));

        let c = LoraConfig { target_modules: TargetModules::Regex(r"model\.layers\.[01]\.self_attn\.q_proj".into()), ..Default::default() };
        assert_eq!(c.select(&names()).unwrap().len(), 2);

        let c = LoraConfig {
            target_modules: TargetModules::AllLinear,
            layers_to_transform: Some(vec![2]),
            rank_pattern: vec![("down_proj".into(), 2)],
            alpha_pattern: vec![(r"layers\.2\.self_attn\.q_proj".into(), 32.0)],
            use_rslora: true,
            r: 4,
            lora_alpha: 8.0,
            ..Default::default()
        };
        let s = c.select(&names()).unwrap();
        assert_eq!(s.len(), 3);
        let by = |n: &str| s.iter().find(|m| m.name.ends_with(n)).unwrap().clone();
        assert_eq!((by("down_proj").r, by("down_proj").scale), (2, 8.0 / 2f32.sqrt()));
        assert_eq!((by("q_proj").r, by("q_proj").scale), (4, 32.0 / 2.0));
        assert_eq!(by("v_proj").scale, 4.0);
        // "q" alone is not a suffix component of "q_proj"
        let c = LoraConfig { target_modules: TargetModules::Names(vec!["q".into()]), ..Default::default() };
        let e = c.select(&names()).unwrap_err().to_string();
        assert!(e.contains("\"q\"") && e.contains("q_proj"), "{e}");
    }

    #[test]
    fn roundtrips_through_peft_json_and_refuses_unsupported() {
        let c = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            use_rslora: true,
            layers_to_transform: Some(vec![0, 1]),
            rank_pattern: vec![("v_proj".into(), 4)],
            alpha_pattern: vec![("q_proj".into(), 2.5)],
            ..Default::default()
        };
        let v = c.to_peft_json();
        assert_eq!(LoraConfig::from_peft_json(&v).unwrap(), c);
        let mut dora = v.clone();
        dora["use_dora"] = json!(true);
        assert!(LoraConfig::from_peft_json(&dora).unwrap_err().to_string().contains("DoRA"));
        let mut mts = v.clone();
        mts["modules_to_save"] = json!(["lm_head"]);
        assert!(LoraConfig::from_peft_json(&mts).unwrap_err().to_string().contains("modules_to_save"));
        let mut bias = v.clone();
        bias["bias"] = json!("all");
        assert!(LoraConfig::from_peft_json(&bias).unwrap_err().to_string().contains("bias"));
        let mut unknown = v;
        unknown["some_future_key"] = json!({"x": 1});
        assert!(LoraConfig::from_peft_json(&unknown).is_ok());
    }
}
