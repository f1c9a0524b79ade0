//! Splitting a markdown document so that only prose reaches the model.
//!
//! Models translate code, rewrite URLs and "fix" markup when they see them. So [`plan`] keeps code
//! blocks (fenced, indented), front matter and `<pre>`/`<script>`/`<style>`/comment blocks out of
//! the text entirely, and inside prose replaces inline code, link destinations, reference
//! definitions, autolinks, raw HTML and bare URLs with numbered placeholders `⟦0⟧`, `⟦1⟧`, ...
//! that a model copies through. Link text and image alt text stay in the prose and get translated.
//! [`Plan::assemble`] checks every placeholder came back exactly once and restores the originals.
//!
//! Prose is grouped into chunks of at most `max_chars` characters at paragraph boundaries; a
//! paragraph too big for one chunk is cut at line, then sentence, then word boundaries. A chunk's
//! surrounding whitespace never goes to the model, so the document's blank lines and indentation
//! come back exactly as they were.
//!
//! This is a line-oriented approximation of CommonMark, not a parser: code fences inside block
//! quotes are translated like prose, and shortcut reference links (`[text]` or `[text][]`, where
//! the text is also the label) lose their target when the text is translated.

use std::fmt::Write as _;

/// Limits below this would leave no room for text next to a placeholder.
const MIN_CHUNK_CHARS: usize = 16;

/// Instructions for the model; they must match what [`plan`] does to the text.
///
/// `source_language` may be empty or `auto` to let the model detect it. `is_title` asks for a
/// single line (document titles are sent on their own, without markdown).
pub fn system_prompt(source_language: &str, target_language: &str, is_title: bool) -> String {
    let source = source_language.trim();
    let from = if source.is_empty() || source.eq_ignore_ascii_case("auto") {
        String::new()
    } else {
        format!(" from {source}")
    };
    if is_title {
        return format!(
            "You are a professional translator. Translate the title given by the user{from} into \
             {target_language}. Reply with the translated title only, on a single line, without \
             quotes, notes or explanations. Copy tokens like ⟦0⟧ unchanged."
        );
    }
    format!(
        "You are a professional translator. Translate the markdown text given by the \
         user{from} into {target_language}. Reply with the translation only, without preamble, \
         notes or explanations, and without wrapping it in a code block.\n\
         Keep the markdown syntax exactly as it is: heading markers, list bullets and numbers, \
         '>' quote markers, table pipes, emphasis markers, line breaks and blank lines.\n\
         Tokens like ⟦0⟧ and ⟦1⟧ stand for code, links and markup that must not change: copy \
         every one of them exactly once, unchanged, to the place where it belongs in the \
         translated sentence, and add no new ones.\n\
         Text that is already in {target_language}, and names or numbers that need no \
         translation, stay as they are."
    )
}

/// A document split into untouched parts and chunks to translate; see the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    segments: Vec<Segment>,
    chunks: Vec<Chunk>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Verbatim(String),
    Chunk(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    /// Whitespace before the sent text, put back as it was.
    lead: String,
    /// What the model gets: prose with `⟦n⟧` placeholders, trimmed.
    text: String,
    /// The original text behind each placeholder, by number.
    holes: Vec<String>,
    /// Whitespace after the sent text.
    trail: String,
}

impl Plan {
    /// The texts to send to the model, in order; each has its own placeholder numbering from 0.
    pub fn chunks(&self) -> Vec<String> {
        self.chunks.iter().map(|c| c.text.clone()).collect()
    }

    /// Rebuilds the document from one translation per chunk (in the order of [`Plan::chunks`]).
    ///
    /// Fails, naming the chunk and placeholder, when a placeholder is missing, repeated or unknown:
    /// the structure behind it would otherwise be lost silently.
    pub fn assemble(&self, translated: &[String]) -> Result<String, String> {
        if translated.len() != self.chunks.len() {
            return Err(format!(
                "expected {} translated chunks, got {}",
                self.chunks.len(),
                translated.len()
            ));
        }
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Verbatim(text) => out.push_str(text),
                Segment::Chunk(i) => {
                    let chunk = &self.chunks[*i];
                    out.push_str(&chunk.lead);
                    out.push_str(&restore(translated[*i].trim(), &chunk.holes, *i)?);
                    out.push_str(&chunk.trail);
                }
            }
        }
        Ok(out)
    }
}

/// Replaces `⟦n⟧` (spaces inside tolerated) by the original text; anything else is kept literally.
fn restore(text: &str, holes: &[String], chunk: usize) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut seen = vec![false; holes.len()];
    let mut rest = text;
    while let Some(at) = rest.find('⟦') {
        out.push_str(&rest[..at]);
        let after = &rest[at + '⟦'.len_utf8()..];
        let inner_end = after.find('⟧');
        let number = inner_end.and_then(|end| after[..end].trim().parse::<usize>().ok());
        match (number, inner_end) {
            (Some(n), Some(end)) => {
                let Some(original) = holes.get(n) else {
                    return Err(format!(
                        "chunk {chunk}: unknown placeholder ⟦{n}⟧ in the translation"
                    ));
                };
                if std::mem::replace(&mut seen[n], true) {
                    return Err(format!("chunk {chunk}: placeholder ⟦{n}⟧ appears more than once in the translation"));
                }
                out.push_str(original);
                rest = &after[end + '⟧'.len_utf8()..];
            }
            _ => {
                out.push('⟦');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    if let Some(n) = seen.iter().position(|s| !s) {
        return Err(format!(
            "chunk {chunk}: placeholder ⟦{n}⟧ is missing from the translation"
        ));
    }
    Ok(out)
}

/// Splits `doc` into untouched parts and chunks of at most `max_chars` characters to translate.
///
/// `max_chars` counts the text as sent, placeholders included; values below 16 count as 16.
pub fn plan(doc: &str, max_chars: usize) -> Plan {
    let max = max_chars.max(MIN_CHUNK_CHARS);
    let mut builder = Builder::default();
    for block in blocks(doc) {
        match block {
            Block::Verbatim(text) => builder.verbatim(text),
            Block::Prose(text) => {
                let pieces = scan_inline(&text);
                if has_words(&pieces) {
                    builder.prose(pieces, max);
                } else {
                    builder.verbatim(text);
                }
            }
        }
    }
    builder.finish()
}

// ---- Assembling the plan ------------------------------------------------------------------------

/// A part of a prose block: text the model sees, or original text hidden behind a placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Hole(String),
}

fn has_words(pieces: &[Piece]) -> bool {
    pieces
        .iter()
        .any(|p| matches!(p, Piece::Text(t) if t.chars().any(char::is_alphabetic)))
}

/// Characters the pieces take when sent, with placeholders numbered from `first`.
fn width(pieces: &[Piece], first: usize) -> usize {
    let mut n = first;
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.chars().count(),
            Piece::Hole(_) => {
                n += 1;
                2 + digits(n - 1)
            }
        })
        .sum()
}

fn digits(n: usize) -> usize {
    n.checked_ilog10().unwrap_or(0) as usize + 1
}

fn holes(pieces: &[Piece]) -> usize {
    pieces
        .iter()
        .filter(|p| matches!(p, Piece::Hole(_)))
        .count()
}

fn original(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) | Piece::Hole(t) => t.as_str(),
        })
        .collect()
}

/// Collects segments, merging consecutive paragraphs into one chunk while they fit.
#[derive(Default)]
struct Builder {
    segments: Vec<Segment>,
    chunks: Vec<Chunk>,
    /// The chunk being filled.
    open: Vec<Piece>,
    /// Blank lines after `open`: inside the chunk if another paragraph joins it, untouched if not.
    gap: String,
}

impl Builder {
    fn verbatim(&mut self, text: String) {
        if !self.open.is_empty() && text.trim().is_empty() {
            self.gap.push_str(&text);
            return;
        }
        self.close();
        self.push_verbatim(text);
    }

    fn prose(&mut self, pieces: Vec<Piece>, max: usize) {
        if !self.open.is_empty() {
            let used = width(&self.open, 0) + self.gap.chars().count();
            if used + width(&pieces, holes(&self.open)) <= max {
                let gap = std::mem::take(&mut self.gap);
                self.open.push(Piece::Text(gap));
                self.open.extend(pieces);
                return;
            }
            self.close();
        }
        if width(&pieces, 0) <= max {
            self.open = pieces;
        } else {
            for part in split(pieces, max, 0) {
                self.push_chunk(part);
            }
        }
    }

    fn close(&mut self) {
        let open = std::mem::take(&mut self.open);
        if !open.is_empty() {
            self.push_chunk(open);
        }
        let gap = std::mem::take(&mut self.gap);
        self.push_verbatim(gap);
    }

    fn push_verbatim(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        if let Some(Segment::Verbatim(last)) = self.segments.last_mut() {
            last.push_str(&text);
        } else {
            self.segments.push(Segment::Verbatim(text));
        }
    }

    fn push_chunk(&mut self, pieces: Vec<Piece>) {
        if !has_words(&pieces) {
            // Parts of a cut paragraph can be bare syntax or placeholders: nothing to translate.
            self.push_verbatim(original(&pieces));
            return;
        }
        let mut text = String::new();
        let mut hole_texts = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Hole(h) => {
                    let _ = write!(text, "⟦{}⟧", hole_texts.len());
                    hole_texts.push(h);
                }
            }
        }
        // Placeholders are not whitespace, so trimming never cuts into one.
        let body_start = text.len() - text.trim_start().len();
        let body_end = text.trim_end().len();
        let chunk = Chunk {
            lead: text[..body_start].to_string(),
            trail: text[body_end..].to_string(),
            text: text[body_start..body_end].to_string(),
            holes: hole_texts,
        };
        self.segments.push(Segment::Chunk(self.chunks.len()));
        self.chunks.push(chunk);
    }

    fn finish(mut self) -> Plan {
        self.close();
        Plan {
            segments: self.segments,
            chunks: self.chunks,
        }
    }
}

/// Cuts an oversized paragraph into parts of at most `max` characters, preferring line
/// boundaries, then sentence ends, then spaces, and only then arbitrary characters.
fn split(pieces: Vec<Piece>, max: usize, level: usize) -> Vec<Vec<Piece>> {
    if level > 3 || width(&pieces, 0) <= max {
        return vec![pieces];
    }
    let mut out = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    for unit in units(pieces, level) {
        if width(&unit, 0) > max {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            out.extend(split(unit, max, level + 1));
        } else if width(&current, 0) + width(&unit, holes(&current)) > max {
            out.push(std::mem::replace(&mut current, unit));
        } else {
            current.extend(unit);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Cuts pieces after each boundary of the given level; placeholders are never cut.
fn units(pieces: Vec<Piece>, level: usize) -> Vec<Vec<Piece>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for piece in pieces {
        let text = match piece {
            Piece::Hole(_) => {
                current.push(piece);
                continue;
            }
            Piece::Text(text) => text,
        };
        let mut start = 0;
        for cut in cuts(&text, level) {
            current.push(Piece::Text(text[start..cut].to_string()));
            out.push(std::mem::take(&mut current));
            start = cut;
        }
        if start < text.len() {
            current.push(Piece::Text(text[start..].to_string()));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Byte offsets inside `text` (never 0 or its length) after which a new unit starts.
fn cuts(text: &str, level: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(at, c)) in chars.iter().enumerate() {
        let next = chars.get(k + 1).map(|&(_, n)| n);
        let end = at + c.len_utf8();
        let cut = match level {
            0 => c == '\n',
            1 => {
                // After the whitespace that follows a sentence end, so the space stays behind.
                let ended = |i: usize| {
                    matches!(chars[i].1, '.' | '!' | '?' | ':' | ';')
                        || matches!(chars[i].1, '。' | '！' | '？' | '；')
                };
                matches!(c, '。' | '！' | '？' | '；')
                    || (c.is_whitespace()
                        && next.is_some_and(|n| !n.is_whitespace())
                        && (0..k)
                            .rev()
                            .find(|&i| !chars[i].1.is_whitespace())
                            .is_some_and(ended))
            }
            2 => c.is_whitespace() && next.is_some_and(|n| !n.is_whitespace()),
            _ => true,
        };
        if cut && end < text.len() {
            out.push(end);
        }
    }
    out
}

// ---- Blocks -------------------------------------------------------------------------------------

enum Block {
    /// Code, front matter, raw HTML blocks and blank lines, copied as they are.
    Verbatim(String),
    /// One paragraph-like run of non-blank lines (a heading, a list, a table...).
    Prose(String),
}

/// Classifies lines into blocks; each line keeps its line ending.
fn blocks(doc: &str) -> Vec<Block> {
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let mut out: Vec<Block> = Vec::new();
    let push = |out: &mut Vec<Block>, line: &str, verbatim: bool| match (out.last_mut(), verbatim) {
        (Some(Block::Verbatim(text)), true) | (Some(Block::Prose(text)), false) => {
            text.push_str(line)
        }
        (_, true) => out.push(Block::Verbatim(line.to_string())),
        (_, false) => out.push(Block::Prose(line.to_string())),
    };
    let mut i = 0;
    if let Some(end) = front_matter(&lines) {
        for line in &lines[..=end] {
            push(&mut out, line, true);
        }
        i = end + 1;
    }
    // Content columns of the open list items, innermost last: code inside a list is indented
    // relative to its item, not to the margin.
    let mut lists: Vec<usize> = Vec::new();
    let mut after_blank = true;
    let mut in_indented_code = false;
    while i < lines.len() {
        let line = lines[i];
        let content = line.trim_end_matches(['\n', '\r']);
        if content.trim().is_empty() {
            push(&mut out, line, true);
            after_blank = true;
            i += 1;
            continue;
        }
        let indent = indentation(content);
        let code_column = lists.last().copied().unwrap_or(0) + 4;
        if (after_blank || in_indented_code) && indent >= code_column {
            push(&mut out, line, true);
            in_indented_code = true;
            after_blank = false;
            i += 1;
            continue;
        }
        in_indented_code = false;
        if let Some(end) = fenced_block(&lines, i).or_else(|| html_block(&lines, i)) {
            for line in &lines[i..=end] {
                push(&mut out, line, true);
            }
            after_blank = true;
            i = end + 1;
            continue;
        }
        if let Some(column) = list_item(content) {
            while lists.last().is_some_and(|&c| c > indent) {
                lists.pop();
            }
            lists.push(column);
        } else if after_blank {
            while lists.last().is_some_and(|&c| c > indent) {
                lists.pop();
            }
        }
        push(&mut out, line, false);
        after_blank = false;
        i += 1;
    }
    out
}

/// Columns of leading whitespace, tabs to the next multiple of 4.
fn indentation(line: &str) -> usize {
    let mut column = 0;
    for c in line.chars() {
        match c {
            ' ' => column += 1,
            '\t' => column += 4 - column % 4,
            _ => break,
        }
    }
    column
}

/// The column where a list item's content starts, if the line starts a list item.
fn list_item(line: &str) -> Option<usize> {
    let indent = indentation(line);
    let rest = line.trim_start();
    let marker = if rest.starts_with(['-', '*', '+']) {
        1
    } else {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if !(1..=9).contains(&digits) || !rest[digits..].starts_with(['.', ')']) {
            return None;
        }
        digits + 1
    };
    let after = &rest[marker..];
    let spaces = after.chars().take_while(|&c| c == ' ').count();
    if after.is_empty() || !(1..=4).contains(&spaces) || after.len() == spaces {
        return None;
    }
    Some(indent + marker + spaces)
}

/// `---` ... `---` (YAML) or `+++` ... `+++` (TOML) at the very start: the last line's index.
fn front_matter(lines: &[&str]) -> Option<usize> {
    let first = lines.first()?.trim_end();
    let closers: &[&str] = match first {
        "---" => &["---", "..."],
        "+++" => &["+++"],
        _ => return None,
    };
    (1..lines.len()).find(|&i| closers.contains(&lines[i].trim_end()))
}

/// A code fence opening at line `i`: the index of its closing line, or of the last line when it
/// is never closed (the block then runs to the end, as in CommonMark).
fn fenced_block(lines: &[&str], i: usize) -> Option<usize> {
    let open = lines[i].trim();
    let fence = open.chars().next().filter(|&c| c == '`' || c == '~')?;
    let length = open.chars().take_while(|&c| c == fence).count();
    if length < 3 || (fence == '`' && open[length..].contains('`')) {
        return None;
    }
    let closes = |line: &str| {
        let line = line.trim();
        let run = line.chars().take_while(|&c| c == fence).count();
        run >= length && line[run..].trim().is_empty()
    };
    Some(
        (i + 1..lines.len())
            .find(|&j| closes(lines[j]))
            .unwrap_or(lines.len() - 1),
    )
}

/// Raw HTML blocks whose content is not prose (`<pre>`, `<script>`, `<style>`, `<textarea>`,
/// comments): the index of the line that ends them.
fn html_block(lines: &[&str], i: usize) -> Option<usize> {
    let line = lines[i];
    if indentation(line) > 3 {
        return None;
    }
    let start = line.trim_start().to_ascii_lowercase();
    let end_marker = if start.starts_with("<!--") {
        "-->".to_string()
    } else {
        let tag = ["pre", "script", "style", "textarea"]
            .into_iter()
            .find(|tag| {
                start
                    .strip_prefix('<')
                    .and_then(|s| s.strip_prefix(tag))
                    .is_some_and(|s| {
                        s.is_empty() || s.starts_with(|c: char| c == '>' || c.is_whitespace())
                    })
            })?;
        format!("</{tag}>")
    };
    // The end may be on the opening line itself, after the opener.
    let first_search = if end_marker == "-->" { 4 } else { 1 };
    if start
        .get(first_search..)
        .is_some_and(|s| s.contains(&end_marker))
    {
        return Some(i);
    }
    Some(
        (i + 1..lines.len())
            .find(|&j| lines[j].to_ascii_lowercase().contains(&end_marker))
            .unwrap_or(lines.len() - 1),
    )
}

// ---- Inline structure ---------------------------------------------------------------------------

/// Collects pieces, merging adjacent text.
#[derive(Default)]
struct Pieces(Vec<Piece>);

impl Pieces {
    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(Piece::Text(t)) => t.push_str(text),
            _ => self.0.push(Piece::Text(text.to_string())),
        }
    }

    fn hole(&mut self, text: &str) {
        self.0.push(Piece::Hole(text.to_string()));
    }
}

/// Splits one prose block into text and placeholder pieces.
fn scan_inline(s: &str) -> Vec<Piece> {
    let b = s.as_bytes();
    let mut out = Pieces::default();
    let mut text_start = 0;
    let mut i = 0;
    let mut open_brackets = 0usize;
    // Each rule yields the byte range to hide; `i` then moves past it.
    while i < b.len() {
        let line_start = i == 0 || b[i - 1] == b'\n';
        let hide: Option<(usize, usize)> = if line_start {
            reference_definition(s, i)
        } else {
            None
        }
        .or_else(|| match b[i] {
            b'\\' if b.get(i + 1).is_some_and(u8::is_ascii_punctuation) => {
                i += 2;
                Some((0, 0))
            }
            b'`' => match code_span(s, i) {
                Some(end) => Some((i, end)),
                None => {
                    // An unmatched run is literal as a whole; its tail must not open a span.
                    i += b[i..].iter().take_while(|&&c| c == b'`').count();
                    Some((0, 0))
                }
            },
            b'<' => angle(s, i).map(|end| (i, end)),
            b'[' => {
                open_brackets += 1;
                None
            }
            b']' if open_brackets > 0 => {
                open_brackets -= 1;
                match b.get(i + 1) {
                    Some(b'(') => link_destination(s, i + 1).map(|end| (i + 1, end)),
                    Some(b'[') => s[i + 1..].find(']').map(|end| (i + 1, i + 1 + end + 1)),
                    _ => None,
                }
            }
            b'h' | b'H' | b'w' | b'W' => bare_url(s, i).map(|end| (i, end)),
            _ if s[i..].starts_with(['⟦', '⟧']) => Some((i, i + '⟦'.len_utf8())),
            _ => None,
        });
        match hide {
            Some((0, 0)) => {} // an escape or literal backticks: stepped over, stays text
            Some((start, end)) => {
                out.text(&s[text_start..start]);
                out.hole(&s[start..end]);
                text_start = end;
                i = end;
            }
            None => {
                // `[` and `]` matched above are ASCII; step one whole char otherwise.
                i += s[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    out.text(&s[text_start..]);
    out.0
}

/// `[label]: destination "title"` at line start (up to 3 spaces in): the range to hide, which is
/// the whole definition, since the label must match its uses and the URL must not change.
fn reference_definition(s: &str, line_start: usize) -> Option<(usize, usize)> {
    let line_end = s[line_start..]
        .find('\n')
        .map_or(s.len(), |e| line_start + e);
    let line = s[line_start..line_end].trim_end_matches('\r');
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 || !line[indent..].starts_with('[') {
        return None;
    }
    let close = line[indent..].find("]:")? + indent;
    let label = &line[indent + 1..close];
    let destination = line[close + 2..].trim();
    if label.trim().is_empty() || label.contains(['[', ']']) || destination.is_empty() {
        return None;
    }
    Some((line_start + indent, line_start + line.len()))
}

/// A code span opening at `i`: the end of its closing backtick run of the same length.
fn code_span(s: &str, i: usize) -> Option<usize> {
    let b = s.as_bytes();
    let run = |at: usize| b[at..].iter().take_while(|&&c| c == b'`').count();
    let length = run(i);
    let mut j = i + length;
    while j < b.len() {
        if b[j] == b'`' {
            let closing = run(j);
            if closing == length {
                return Some(j + closing);
            }
            j += closing;
        } else {
            j += 1;
        }
    }
    None
}

/// An autolink, HTML tag, comment, declaration or processing instruction at `i` (a `<`): its end.
fn angle(s: &str, i: usize) -> Option<usize> {
    let rest = &s[i + 1..];
    let find_after = |marker: &str, skip: usize| {
        rest.get(skip..)?
            .find(marker)
            .map(|at| i + 1 + skip + at + marker.len())
    };
    if rest.starts_with("!--") {
        return find_after("-->", 3);
    }
    if rest.starts_with('?') {
        return find_after("?>", 1);
    }
    if rest.starts_with('!') && rest[1..].starts_with(|c: char| c.is_ascii_alphabetic()) {
        return find_after(">", 1);
    }
    // Autolink: <scheme:...> or <user@host>, nothing inside that could end a tag.
    let inner_len = rest.find(|c: char| c == '>' || c == '<' || c.is_whitespace());
    if let Some(len) = inner_len.filter(|&len| rest[len..].starts_with('>')) {
        let inner = &rest[..len];
        let scheme = inner.split(':').next().unwrap_or("");
        let is_uri = inner.contains(':')
            && (2..=32).contains(&scheme.len())
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'));
        let is_email = inner.contains('@') && !inner.starts_with('@') && !inner.ends_with('@');
        if is_uri || is_email {
            return Some(i + 1 + len + 1);
        }
    }
    // A tag: <name ...>, </name>, attributes possibly quoted (and containing '>').
    let name = rest.strip_prefix('/').unwrap_or(rest);
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let name_len = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(name.len());
    if !name[name_len..].starts_with(|c: char| c == '>' || c == '/' || c.is_whitespace()) {
        return None;
    }
    let mut quote: Option<char> = None;
    for (at, c) in rest.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => return Some(i + 1 + at + 1),
            (None, '<') => return None,
            _ => {}
        }
    }
    None
}

/// An inline link's `(destination "title")` starting at `i` (a `(`): the end after its `)`.
fn link_destination(s: &str, i: usize) -> Option<usize> {
    let b = s.as_bytes();
    let skip_space = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    let mut j = skip_space(i + 1);
    if b.get(j) == Some(&b'<') {
        j += s[j..].find(['>', '\n'])?;
        if b[j] != b'>' {
            return None;
        }
        j += 1;
    } else {
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'\\' => j += 1,
                b'(' => depth += 1,
                b')' if depth == 0 => break,
                b')' => depth -= 1,
                c if c.is_ascii_whitespace() => break,
                _ => {}
            }
            j += 1;
        }
    }
    j = skip_space(j);
    if let Some(&open) = b.get(j).filter(|&&c| matches!(c, b'"' | b'\'' | b'(')) {
        let close = if open == b'(' { b')' } else { open };
        j += 1;
        while j < b.len() && b[j] != close {
            if b[j] == b'\\' {
                j += 1;
            }
            j += 1;
        }
        j = skip_space(j + 1);
    }
    (b.get(j) == Some(&b')')).then_some(j + 1)
}

/// `http://`, `https://` or `www.` at `i`, not inside a word: the end of the URL, without the
/// trailing punctuation that usually belongs to the sentence.
fn bare_url(s: &str, i: usize) -> Option<usize> {
    if s[..i]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '/' || c == '.')
    {
        return None;
    }
    let rest = &s[i..];
    let lower: String = rest
        .chars()
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let prefix = ["https://", "http://", "www."]
        .into_iter()
        .find(|p| lower.starts_with(p))?;
    let mut end = rest
        .find(|c: char| c.is_whitespace() || c == '<' || c == '⟦' || c == '⟧')
        .unwrap_or(rest.len());
    loop {
        let url = &rest[..end];
        let Some(last) = url.chars().next_back() else {
            break;
        };
        let unbalanced = last == ')' && url.matches(')').count() > url.matches('(').count();
        if matches!(
            last,
            '.' | ',' | ':' | ';' | '!' | '?' | '"' | '\'' | '*' | '_' | '~'
        ) || unbalanced
        {
            end -= last.len_utf8();
        } else {
            break;
        }
    }
    (end > prefix.len()).then_some(i + end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends every chunk through `f` and reassembles.
    fn translate(doc: &str, max: usize, f: impl Fn(&str) -> String) -> String {
        let p = plan(doc, max);
        let out: Vec<String> = p.chunks().iter().map(|c| f(c)).collect();
        p.assemble(&out).unwrap()
    }

    const DOC: &str = "---\ntitle: front matter stays\n---\n\n\
        # Getting started\n\n\
        Install with `cargo install lodge` and read [the guide](https://example.com/Guide \"The Guide\").\n\
        See <https://example.com/auto> or https://example.com/bare_Path, and <b>bold</b>.\n\n\
        ```rust\nfn main() { println!(\"hello\"); }\n```\n\n\
        ~~~~ text\ntilde fence\n~~~~\n\n\
        Some text.\n\n    indented code\n    more code\n\n\
        - item one with ![an image](img/Pic.png)\n- item [two][Ref]\n\n\
        | a | b |\n|---|---|\n| x | y |\n\n\
        [Ref]: https://example.com/Ref \"Title\"\n\n\
        <!-- a comment\nacross lines -->\n\n\
        ---\n\n\
        Last paragraph ⟦not a placeholder⟧.\n";

    #[test]
    fn identity_round_trip_is_exact() {
        for max in [16, 40, 100, 10_000] {
            assert_eq!(translate(DOC, max, str::to_string), DOC, "max {max}");
        }
        assert_eq!(translate("", 100, str::to_string), "");
        assert_eq!(translate("\n\n  \n", 100, str::to_string), "\n\n  \n");
        assert_eq!(translate("no newline", 100, str::to_string), "no newline");
        assert!(plan("\n\n  \n", 100).chunks().is_empty());
    }

    #[test]
    fn code_blocks_are_verbatim_and_never_sent() {
        let p = plan(DOC, 10_000);
        let sent = p.chunks().join("\n");
        for code in [
            "fn main",
            "tilde fence",
            "indented code",
            "front matter",
            "a comment",
        ] {
            assert!(!sent.contains(code), "{code:?} was sent: {sent}");
        }
        let out = translate(DOC, 10_000, str::to_uppercase);
        assert!(out.contains("```rust\nfn main() { println!(\"hello\"); }\n```\n"));
        assert!(out.contains("~~~~ text\ntilde fence\n~~~~\n"));
        assert!(out.contains("\n    indented code\n    more code\n"));
        assert!(out.starts_with("---\ntitle: front matter stays\n---\n"));
        assert!(out.contains("<!-- a comment\nacross lines -->"));
        assert!(out.contains("SOME TEXT."));
    }

    #[test]
    fn indented_list_content_is_prose_but_deeper_code_is_not() {
        let doc = "- item\n\n    continued in the item\n\n        code in the item\n";
        let p = plan(doc, 1000);
        let sent = p.chunks().join("\n");
        assert!(sent.contains("continued in the item"), "{sent}");
        assert!(!sent.contains("code in the item"), "{sent}");
        // A line indented right after a paragraph line continues the paragraph.
        let doc = "para\n    lazy continuation\n";
        assert!(plan(doc, 1000).chunks()[0].contains("lazy continuation"));
    }

    #[test]
    fn links_keep_their_urls_and_get_their_text_translated() {
        let out = translate(DOC, 10_000, str::to_uppercase);
        assert!(
            out.contains("[THE GUIDE](https://example.com/Guide \"The Guide\")"),
            "{out}"
        );
        assert!(out.contains("`cargo install lodge`"), "{out}");
        assert!(out.contains("<https://example.com/auto>"), "{out}");
        assert!(
            out.contains("https://example.com/bare_Path, AND <b>BOLD</b>."),
            "{out}"
        );
        assert!(out.contains("![AN IMAGE](img/Pic.png)"), "{out}");
        assert!(out.contains("[TWO][Ref]"), "{out}");
        assert!(
            out.contains("[Ref]: https://example.com/Ref \"Title\""),
            "{out}"
        );
        assert!(out.contains("# GETTING STARTED"), "{out}");
        assert!(out.contains("LAST PARAGRAPH ⟦NOT A PLACEHOLDER⟧."), "{out}");
        let sent = plan(DOC, 10_000).chunks().join("\n");
        assert!(!sent.contains("example.com"), "{sent}");
        assert!(sent.contains("[the guide]⟦"), "{sent}");
    }

    #[test]
    fn tricky_inline_syntax() {
        let doc = "Escaped \\[not a link\\](x) and \\`no code\\`, ``code with ` inside``, \
                   a < b > c, [nested (parens)](https://x.org/a_(b)) (see https://x.org/p).";
        let p = plan(doc, 1000);
        let sent = &p.chunks()[0];
        assert!(sent.contains("\\[not a link\\](x)"), "{sent}");
        assert!(sent.contains("\\`no code\\`"), "{sent}");
        assert!(!sent.contains("with ` inside"), "{sent}");
        assert!(sent.contains("a < b > c"), "{sent}");
        assert!(!sent.contains("x.org"), "{sent}");
        assert!(sent.ends_with(")."), "{sent}");
        let out = translate(doc, 1000, str::to_uppercase);
        assert!(
            out.contains("[NESTED (PARENS)](https://x.org/a_(b)) (SEE https://x.org/p)."),
            "{out}"
        );
    }

    #[test]
    fn chunks_respect_the_size_bound() {
        let sentence = "This is a sentence with `code` and a [link](http://example.com/x). ";
        let mut doc = String::new();
        for n in 0..30 {
            doc.push_str(&sentence.repeat(n % 7 + 1));
            doc.push_str(if n % 3 == 0 { "\n\n" } else { "\n" });
        }
        doc.push_str(&"averyveryverylongwordwithoutanyspaces".repeat(10));
        doc.push('\n');
        for max in [16, 50, 120, 400, 2000] {
            let p = plan(&doc, max);
            for (i, chunk) in p.chunks().iter().enumerate() {
                assert!(
                    chunk.chars().count() <= max,
                    "chunk {i} has {} chars, max {max}: {chunk:?}",
                    chunk.chars().count()
                );
                assert!(!chunk.trim().is_empty());
            }
            assert_eq!(p.assemble(&p.chunks()).unwrap(), doc, "max {max}");
        }
        // Paragraphs are merged while they fit, not sent one by one.
        assert!(plan("one\n\ntwo\n\nthree\n", 1000).chunks().len() == 1);
        assert_eq!(
            plan("one\n\ntwo\n\nthree four\n", 16).chunks(),
            ["one\n\ntwo", "three four"]
        );
    }

    #[test]
    fn big_paragraphs_are_cut_at_lines_then_sentences() {
        let doc = "First line here.\nSecond line is here. It has two sentences.\n";
        let p = plan(doc, 30);
        assert_eq!(
            p.chunks(),
            [
                "First line here.",
                "Second line is here.",
                "It has two sentences."
            ]
        );
        assert_eq!(p.assemble(&p.chunks()).unwrap(), doc);
    }

    #[test]
    fn lost_or_repeated_placeholders_are_errors() {
        let p = plan("Use `a` and `b` here.", 1000);
        assert_eq!(p.chunks(), ["Use ⟦0⟧ and ⟦1⟧ here."]);
        let err = p.assemble(&["Nimm ⟦0⟧ hier.".to_string()]).unwrap_err();
        assert!(err.contains("chunk 0") && err.contains("⟦1⟧"), "{err}");
        let err = p.assemble(&["⟦0⟧ ⟦0⟧ ⟦1⟧".to_string()]).unwrap_err();
        assert!(
            err.contains("⟦0⟧") && err.contains("more than once"),
            "{err}"
        );
        let err = p.assemble(&["⟦0⟧ ⟦1⟧ ⟦2⟧".to_string()]).unwrap_err();
        assert!(err.contains("⟦2⟧"), "{err}");
        assert!(p.assemble(&[]).is_err());
        // Reordered placeholders and spaces inside them are fine; surrounding whitespace is ours.
        assert_eq!(
            p.assemble(&["  Hier ⟦ 1 ⟧ und ⟦0⟧.\n".to_string()])
                .unwrap(),
            "Hier `b` und `a`."
        );
    }

    #[test]
    fn prompts_mention_the_languages() {
        let p = system_prompt("English", "German", false);
        assert!(
            p.contains("from English into German") && p.contains("⟦0⟧"),
            "{p}"
        );
        let t = system_prompt("auto", "French", true);
        assert!(t.contains("into French") && !t.contains("from auto"), "{t}");
    }
}
