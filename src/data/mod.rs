//! Training data: JSONL records, chat templates, label masking, sequences and batches.

pub mod examples;
pub mod loader;
pub mod records;
pub mod template;

pub use examples::{make_sequences, Encoder, Example, Sequence, SequenceStats};
pub use loader::{to_batch, Cursor, Loader};
pub use records::{parse_record, read_jsonl, Format, Record};
pub use template::{ChatTemplate, Message};
