//! Chat templates: the model's Jinja template rendered with minijinja under the same settings
//! transformers uses (trim_blocks, lstrip_blocks, Python string methods, raise_exception).

use anyhow::{anyhow, bail, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for messages ("the chat template of models/x.gguf").
    origin: String,
}

/// Collects a render's output up to `limit` bytes; past it, writing fails and the render stops.
struct BoundedOutput {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + b.len() > self.limit {
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// A template from `source`. Templates are programs from strangers: each render runs under an
    /// execution budget (minijinja's fuel) and an output limit (`limits`), so none can hang or
    /// fill the memory with output.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(crate::limits::TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; a fixed, documented value keeps renders reproducible.
            fmt.replace("%Y", "2026").replace("%m", "01").replace("%d", "01").replace("%B", "January").replace("%b", "Jan")
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| anyhow!("invalid chat template: {e}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into(), origin: "the chat template".into() })
    }

    /// Names where the template came from in error messages.
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = origin.to_string();
        self
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new");
        let limit = crate::limits::MAX_TEMPLATE_OUTPUT;
        let mut out = BoundedOutput { bytes: Vec::new(), limit };
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        match t.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| anyhow!("{} rendered text that is not UTF-8", self.origin)),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => bail!(
                "{} ran past its execution budget of {} steps (a template that loops without end?)",
                self.origin,
                crate::limits::TEMPLATE_FUEL
            ),
            Err(e) if e.kind() == ErrorKind::WriteFailure => {
                bail!("{}'s output exceeds {}", self.origin, crate::limits::human_bytes(limit as u128))
            }
            Err(e) => bail!("rendering {}: {e}", self.origin),
        }
    }

    /// The rendered conversation and, for each assistant message, the byte range of the text it
    /// adds (its content and the template's end-of-turn markup). Found by rendering growing
    /// prefixes, so it works for any template whose renders of a conversation's prefixes are
    /// prefixes of each other.
    pub fn render_with_assistant_spans(&self, messages: &[Message]) -> Result<(String, Vec<(usize, usize)>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                bail!("the chat template does not render conversations prefix by prefix, so assistant turns cannot be located for loss masking (use --train-on-inputs)");
            }
            spans.push((before.len(), through.len()));
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_and_locates_assistant_turns() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let msgs = vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "2+2?"),
            Message::new("assistant", "4"),
        ];
        let (text, spans) = t.render_with_assistant_spans(&msgs).unwrap();
        assert!(text.starts_with("<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"));
        assert_eq!(spans.len(), 2);
        assert_eq!(&text[spans[0].0..spans[0].1], "Hello!<|im_end|>\n");
        assert_eq!(&text[spans[1].0..spans[1].1], "4<|im_end|>\n");
    }

    #[test]
    fn python_methods_trim_settings_and_raise_exception() {
        let src = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\n{% for m in messages %}\n  {{ m['content'].strip().upper() }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "  HI\n");
        let e = t.render(&[Message::new("bad", "x")], false).unwrap_err().to_string();
        assert!(e.contains("no bad roles"), "{e}");
    }

    #[test]
    fn hostile_templates_stop_at_their_budget() {
        let msgs = [Message::new("user", "hi")];
        let loops = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "", "")
            .unwrap()
            .with_origin("the chat template of m.gguf");
        let e = loops.render(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("the chat template of m.gguf") && e.contains("execution budget"), "{e}");
        let grows = ChatTemplate::new(
            "{% set ns = namespace(s='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% for i in range(100) %}{{ ns.s }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let e = grows.render(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("output exceeds 64.0 MiB"), "{e}");
    }
}
