//! An inference session: a base model with several adapters, one active at a time, applied
//! unmerged (switching is free) or merged into the weights (zero overhead per token).

use crate::lora::combine::{merge, unmerge, AdapterSet};
use crate::model::adapt::{LowRankSource, NoAdapter};
use crate::model::DecoderModel;
use crate::pretrained::Pretrained;
use anyhow::Result;

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

    pub fn model(&self) -> &DecoderModel {
        &self.base.model
    }

    /// What the forward pass applies on top of the (possibly merged) weights.
    pub fn source(&self) -> &dyn LowRankSource {
        if self.merged_mode {
            &NoAdapter
        } else {
            &self.adapters
        }
    }
}
