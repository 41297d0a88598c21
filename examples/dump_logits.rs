use lowrank::kernels::loss::shift_labels;
use lowrank::model::weights::TensorStore;
use std::path::Path;
fn main() {
    let name = std::env::args().nth(1).unwrap();
    let dir = Path::new("tests/fixtures").join(&name);
    let model = lowrank::DecoderModel::from_hf_dir(&dir.join("model")).unwrap();
    let adapter = lowrank::lora::peft::load(&dir.join("peft_adapter"), &model).unwrap();
    let ex = TensorStore::open_files(&[dir.join("expected.safetensors")]).unwrap();
    let (ids, shape) = ex.i64("input_ids").unwrap();
    let (mask, _) = ex.i64("attention_mask").unwrap();
    let (labels, _) = ex.i64("labels").unwrap();
    let _ = shift_labels(&labels, shape[1]);
    let batch =
        lowrank::Batch::new(ids.iter().map(|&t| t as u32).collect(), mask.iter().map(|&m| m != 0).collect(), shape[0], shape[1]).unwrap();
    let lg = model.forward(&batch, &adapter).unwrap();
    let base = model.forward(&batch, &lowrank::model::adapt::NoAdapter).unwrap();
    let mut t = std::collections::BTreeMap::new();
    t.insert("logits".to_string(), (vec![lg.len()], lg));
    t.insert("base".to_string(), (vec![base.len()], base));
    std::fs::write("/tmp/ours.safetensors", lowrank::model::weights::serialize_f32(&t, None).unwrap()).unwrap();
}
