//! An inference session: a base model with several adapters, one active at a time, applied
//! unmerged (switching is free) or merged into the weights (zero overhead per token).

use super::SharedAdapter;
use crate::lora::combine::{merge, unmerge, AdapterSet, AdapterSpec};
use crate::model::DecoderModel;
use crate::model::WeightFormat;
use crate::pretrained::Pretrained;
use anyhow::{bail, Result};

pub struct Session {
    pub base: Pretrained,
    pub adapters: AdapterSet,
    merged_mode: bool,
    /// The adapter currently folded into `base.model`, with its scale.
    merged: Option<usize>,
}

impl Session {
    pub fn new(base: Pretrained, adapters: AdapterSet, merged_mode: bool) -> Result<Self> {
        let mut s = Session { base, adapters, merged_mode, merged: None };
        s.sync_merge()?;
        Ok(s)
    }

    /// Loads the model at `model` (its weights kept as `weights`) and the adapters `specs`
    /// name (`[NAME=]PATH[@SCALE]`; the first starts active), merged into the weights or not.
    pub fn load(model: &std::path::Path, weights: WeightFormat, specs: &[String], merged: bool) -> Result<Self> {
        if merged && specs.is_empty() {
            bail!("--merged needs an --adapter to merge");
        }
        let specs: Vec<AdapterSpec> = specs.iter().map(|s| AdapterSpec::parse(s)).collect::<Result<_>>()?;
        let base = Pretrained::load_as(model, weights)?;
        let mut set = AdapterSet::default();
        for spec in &specs {
            set.load(spec, &base.model)?;
        }
        Session::new(base, set, merged)
    }

    fn sync_merge(&mut self) -> Result<()> {
        if let Some(i) = self.merged.take() {
            let (_, a, scale) = &self.adapters.entries[i];
            unmerge(&mut self.base.model, a, *scale)?;
        }
        if self.merged_mode {
            if let Some(i) = self.adapters.active {
                let (_, a, scale) = &self.adapters.entries[i];
                merge(&mut self.base.model, a, *scale)?;
                self.merged = Some(i);
            }
        }
        Ok(())
    }

    /// Activates adapter `name`, or none.
    pub fn switch(&mut self, name: Option<&str>) -> Result<()> {
        self.adapters.activate(name)?;
        self.sync_merge()
    }

    /// Loads the adapter `spec` names into the set (it does not become active unless it is the
    /// first); what is merged stays merged.
    pub fn load_adapter(&mut self, spec: &AdapterSpec) -> Result<()> {
        self.adapters.load(spec, &self.base.model)?;
        self.sync_merge()
    }

    /// Folds the active adapter into the weights (`true`: zero overhead per token) or applies
    /// it on the fly (`false`: switching is free). Unmerging subtracts exactly what merging
    /// added, so the weights come back to within rounding of the base.
    pub fn set_merged(&mut self, merged: bool) -> Result<()> {
        self.merged_mode = merged;
        self.sync_merge()
    }

    /// Whether the active adapter is folded into the weights.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    pub fn model(&self) -> &DecoderModel {
        &self.base.model
    }

    /// What generation applies on top of the (possibly merged) weights: the active adapter
    /// with its scale, or nothing.
    pub fn adapter(&self) -> Option<(SharedAdapter, f32)> {
        if self.merged_mode {
            None
        } else {
            self.adapters.active_adapter()
        }
    }
}
