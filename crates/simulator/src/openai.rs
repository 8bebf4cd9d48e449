//! OpenAI request and response shapes, and the simulator's deterministic "model": the
//! same prompt always yields the same tokens.

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

#[derive(Debug, Deserialize)]
pub struct InferenceRequest {
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<Value>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    /// `{"include_usage": true}`: a last event with the usage, as vLLM and OpenAI send.
    #[serde(default)]
    pub stream_options: Option<Value>,
    /// llama.cpp's per-request adapters: `[{"id": N, "scale": S}]`.
    #[serde(default)]
    pub lora: Vec<LoraUse>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoraUse {
    pub id: usize,
    #[serde(default)]
    pub scale: f64,
}

impl InferenceRequest {
    /// The first of `loaded` (llama.cpp's `--lora` files) the request applies, if any.
    pub fn lora_applied<'a>(&self, loaded: &'a [String]) -> Option<&'a String> {
        self.lora
            .iter()
            .find(|l| l.scale != 0.0)
            .and_then(|l| loaded.get(l.id))
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn prompt_text(&self) -> String {
        let mut text = String::new();
        for m in &self.messages {
            match &m["content"] {
                Value::String(s) => text.push_str(s),
                other => text.push_str(&other.to_string()),
            }
            text.push('\n');
        }
        match &self.prompt {
            Some(Value::String(s)) => text.push_str(s),
            Some(other) => text.push_str(&other.to_string()),
            None => {}
        }
        text
    }

    pub fn max_tokens(&self, default: u32) -> u32 {
        self.max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default)
    }
}

const WORDS: [&str; 16] = [
    "green", "thread", "sleeps", "wakes", "gpu", "memory", "model", "token", "fast", "fair",
    "queue", "serve", "engine", "ledger", "swap", "light",
];

pub fn count_tokens(text: &str) -> u32 {
    text.split_whitespace().count().max(1) as u32
}

/// What the answer to `prompt` is made from (FNV-1a of the prompt): computed once per
/// request, however long the prompt and the answer.
pub fn prompt_hash(prompt: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    h
}

/// Token `i` of the answer to the prompt of hash `h`: a pure function of both.
pub fn token_of(h: u64, i: u32) -> &'static str {
    let mut h = h ^ u64::from(i).wrapping_mul(0x9e3779b97f4a7c15);
    h = h.wrapping_mul(0x100000001b3);
    WORDS[(h >> 60) as usize]
}

/// Token `i` of the answer to `prompt`.
#[cfg(test)]
pub fn token(prompt: &str, i: u32) -> &'static str {
    token_of(prompt_hash(prompt), i)
}

pub fn completion_body(
    kind: Kind,
    id: &str,
    model: &str,
    text: &str,
    prompt_tokens: u32,
    completion_tokens: u32,
) -> Value {
    let choice = match kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        }
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": "length"}),
    };
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created(),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

pub fn chunk(kind: Kind, id: &str, model: &str, text: Option<&str>, finish: Option<&str>) -> Value {
    let choice = match kind {
        Kind::Chat => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish})
        }
    };
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created(),
        "model": model,
        "choices": [choice],
    })
}

/// The usage event that ends a stream asked for it (no choices).
pub fn usage_chunk(kind: Kind, id: &str, model: &str, prompt: u32, completion: u32) -> Value {
    let mut v = chunk(kind, id, model, None, None);
    v["choices"] = json!([]);
    v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    v
}

pub fn error_body(message: &str, kind: &str, code: u16) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Now, in seconds since the epoch (what `created` fields hold).
pub fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_deterministic_per_prompt() {
        let a: Vec<_> = (0..8).map(|i| token("hello", i)).collect();
        let b: Vec<_> = (0..8).map(|i| token("hello", i)).collect();
        let c: Vec<_> = (0..8).map(|i| token("goodbye", i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
