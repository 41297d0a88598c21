//! A conversation with a chat model: its messages, rendered with the model's chat template for
//! every turn, and a turn that streams the reply and keeps it in the history.

use super::session::Session;
use super::{GenerateParams, Generation, Request};
use crate::data::template::{ChatTemplate, Message};
use anyhow::{Context, Result};

pub struct Conversation {
    template: ChatTemplate,
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A conversation with the session's model, opened by `system` messages (none or several).
    pub fn new(session: &Session, system: &[String]) -> Result<Self> {
        let template = session.base.chat_template()?.context("the model has no chat template")?;
        Ok(Conversation { template, messages: system.iter().map(|m| Message::new("system", m)).collect() })
    }

    /// Forgets every turn; the system messages stay.
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }

    /// The prompt tokens for the next assistant reply after `user`'s message, without keeping it.
    pub fn prompt_for(&self, session: &Session, user: &str) -> Result<Vec<u32>> {
        let mut messages = self.messages.clone();
        messages.push(Message::new("user", user));
        // The rendered template carries its own special tokens.
        session.base.tokenizer.encode(&self.template.render(&messages, true)?, false)
    }

    /// One turn: generates the reply to `user` with the session's active adapter, passing its
    /// text to `on_text` as it becomes final, and keeps both messages. A turn that fails (a
    /// prompt past the context, say) leaves the conversation as it was.
    pub fn turn(&mut self, session: &Session, user: &str, params: &GenerateParams, on_text: impl FnMut(&str)) -> Result<String> {
        let prompt = self.prompt_for(session, user)?;
        let request = Request { prompt, params: params.clone(), adapter: session.adapter() };
        let reply = Generation::new(session.model(), &session.base.tokenizer, request)?.run(on_text)?.text;
        self.messages.push(Message::new("user", user));
        self.messages.push(Message::new("assistant", &reply));
        Ok(reply)
    }
}
