//! CLIP BPE tokenization: OpenAI's vocabulary, SOT/EOT framing, truncation that keeps EOT.

use instant_clip_tokenizer::Tokenizer;

use super::clip::TokenBatch;

/// `<|startoftext|>`.
pub const SOT_TOKEN: i32 = 49406;
/// `<|endoftext|>`.
pub const EOT_TOKEN: i32 = 49407;

/// The CLIP tokenizer with the model's context length.
pub struct ClipTokenizer {
    /// OpenAI's BPE (expensive to build: create once, share).
    inner: Tokenizer,
    /// Maximum sequence length including SOT and EOT (77 for CLIP).
    context_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("context_length", &self.context_length)
            .finish()
    }
}

impl ClipTokenizer {
    pub fn new(context_length: usize) -> Self {
        assert!(context_length >= 2, "context must hold SOT and EOT");
        Self {
            inner: Tokenizer::new(),
            context_length,
        }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// BPE ids of the cleaned caption, without SOT/EOT and untruncated.
    fn bpe(&self, text: &str) -> Vec<i32> {
        let mut tokens = Vec::new();
        self.inner.encode(&clean_text(text), &mut tokens);
        tokens
            .iter()
            .map(|token| i32::from(token.to_u16()))
            .collect()
    }

    /// Token ids of one caption: `[SOT, …, EOT]`, at most `context_length` long. Longer
    /// captions are truncated and their last position replaced by EOT, as OpenAI's
    /// `clip.tokenize(truncate=True)` and open_clip's `tokenize` do.
    pub fn encode(&self, text: &str) -> Vec<i32> {
        let mut ids = vec![SOT_TOKEN];
        ids.extend(self.bpe(text));
        ids.push(EOT_TOKEN);
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = EOT_TOKEN;
        }
        ids
    }

    /// Whether `text` is longer than the context and will be truncated.
    pub fn is_truncated(&self, text: &str) -> bool {
        self.bpe(text).len() + 2 > self.context_length
    }

    /// Tokenizes a batch, padding with 0 to the longest caption.
    pub fn batch<S: AsRef<str>>(&self, texts: &[S]) -> TokenBatch {
        let encoded: Vec<Vec<i32>> = texts.iter().map(|t| self.encode(t.as_ref())).collect();
        batch_from_ids(&encoded)
    }
}

/// Packs already-encoded captions into a padded batch.
pub fn batch_from_ids(encoded: &[Vec<i32>]) -> TokenBatch {
    let seq_len = encoded.iter().map(Vec::len).max().unwrap_or(2);
    let mut ids = vec![0; encoded.len() * seq_len];
    let mut eot_positions = Vec::with_capacity(encoded.len());
    for (row, caption) in encoded.iter().enumerate() {
        ids[row * seq_len..row * seq_len + caption.len()].copy_from_slice(caption);
        let eot = caption
            .iter()
            .position(|&id| id == EOT_TOKEN)
            .unwrap_or(caption.len() - 1);
        eot_positions.push(eot);
    }
    TokenBatch {
        ids,
        eot_positions,
        seq_len,
    }
}

/// The batch followed by a copy of itself (`2n` rows).
pub fn repeat_batch(batch: &TokenBatch) -> TokenBatch {
    let mut ids = batch.ids.clone();
    ids.extend_from_slice(&batch.ids);
    let mut eot_positions = batch.eot_positions.clone();
    eot_positions.extend_from_slice(&batch.eot_positions);
    TokenBatch {
        ids,
        eot_positions,
        seq_len: batch.seq_len,
    }
}

/// open_clip's `whitespace_clean(basic_clean(text))`: the parts of `ftfy.fix_text` that
/// change real captions (curly quotes straightened, ligatures and full-width forms
/// unfolded), HTML entities unescaped, runs of whitespace collapsed, ends trimmed
/// (lowercasing happens in the BPE).
fn clean_text(text: &str) -> String {
    let unescaped = unescape_html(text);
    let mut fixed = String::with_capacity(unescaped.len());
    for c in unescaped.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => fixed.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => fixed.push('"'),
            '\u{FB00}' => fixed.push_str("ff"),
            '\u{FB01}' => fixed.push_str("fi"),
            '\u{FB02}' => fixed.push_str("fl"),
            '\u{FB03}' => fixed.push_str("ffi"),
            '\u{FB04}' => fixed.push_str("ffl"),
            '\u{FF01}'..='\u{FF5E}' => {
                fixed.push(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c));
            }
            '\u{3000}' => fixed.push(' '),
            _ => fixed.push(c),
        }
    }
    fixed.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The few HTML entities that occur in caption data (`html.unescape` handles all of them;
/// the rest pass through unchanged, which the reference-tokenizer test would reveal).
fn unescape_html(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('&') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for (entity, plain) in [
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&apos;", "'"),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&nbsp;", "\u{a0}"),
        ("&amp;", "&"),
    ] {
        out = out.replace(entity, plain);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_with_sot_and_eot() {
        let tokenizer = ClipTokenizer::new(77);
        assert_eq!(tokenizer.encode("Hi there"), vec![49406, 1883, 997, 49407]);
        assert_eq!(tokenizer.encode(""), vec![49406, 49407]);
    }

    #[test]
    fn truncation_keeps_eot_last() {
        let tokenizer = ClipTokenizer::new(8);
        let ids = tokenizer.encode("one two three four five six seven eight nine ten");
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[0], SOT_TOKEN);
        assert_eq!(ids[7], EOT_TOKEN);
        assert!(tokenizer.is_truncated("one two three four five six seven eight nine ten"));
        assert!(!tokenizer.is_truncated("one two"));
    }

    #[test]
    fn ftfy_style_fixes_match_plain_text() {
        let tokenizer = ClipTokenizer::new(77);
        assert_eq!(
            tokenizer.encode("the water\u{2019}s edge"),
            tokenizer.encode("the water's edge")
        );
        assert_eq!(
            tokenizer.encode("\u{FF21}  \u{FB01}eld &amp; x"),
            tokenizer.encode("A field & x")
        );
    }

    #[test]
    fn batch_pads_and_finds_eot() {
        let tokenizer = ClipTokenizer::new(77);
        let batch = tokenizer.batch(&["a", "a b c"]);
        assert_eq!(batch.seq_len, 5);
        assert_eq!(batch.eot_positions, vec![2, 4]);
        assert_eq!(&batch.ids[0..5], &[49406, 320, 49407, 0, 0]);
    }
}
