//! Mail templates: the subject and the plain-text body of a fallback e-mail,
//! in a small subset of Mustache, parsed once at start so a broken template
//! is a configuration error and not a failed send.
//!
//! `{{name}}` is a value; `{{#name}}..{{/name}}` repeats for each item of a
//! list, or renders once when the value is present and not empty, zero or
//! false; `{{^name}}..{{/name}}` renders when it is. Inside a list item its
//! fields come first, then the outer ones. No HTML escaping: the body is
//! plain text. What a template can use is listed in `herald.sample.toml`
//! (`[smtp] subject`).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("'{{{{#{0}}}}}' is never closed")]
    Unclosed(String),
    #[error("'{{{{/{0}}}}}' closes nothing open")]
    Unexpected(String),
    #[error("a '{{{{' without its '}}}}'")]
    Unterminated,
    #[error("an empty tag '{{{{}}}}'")]
    Empty,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Value(String),
    Section { name: String, inverted: bool, body: Vec<Node> },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template(Vec<Node>);

impl Template {
    pub(crate) fn parse(text: &str) -> Result<Self, TemplateError> {
        // Open sections: the name, whether inverted, and the nodes before it.
        let mut stack: Vec<(String, bool, Vec<Node>)> = Vec::new();
        let mut nodes = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                nodes.push(Node::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unterminated)?;
            let tag = after[..end].trim();
            rest = &after[end + 2..];
            let (sigil, name) = match tag.chars().next() {
                Some(c @ ('#' | '^' | '/')) => (Some(c), tag[1..].trim()),
                _ => (None, tag),
            };
            if name.is_empty() {
                return Err(TemplateError::Empty);
            }
            match sigil {
                Some(c @ ('#' | '^')) => stack.push((name.to_owned(), c == '^', std::mem::take(&mut nodes))),
                Some(_) => match stack.pop() {
                    Some((open, inverted, before)) if open == name => {
                        let body = std::mem::replace(&mut nodes, before);
                        nodes.push(Node::Section { name: open, inverted, body });
                    }
                    _ => return Err(TemplateError::Unexpected(name.to_owned())),
                },
                None => nodes.push(Node::Value(name.to_owned())),
            }
        }
        if !rest.is_empty() {
            nodes.push(Node::Text(rest.to_owned()));
        }
        match stack.pop() {
            Some((name, ..)) => Err(TemplateError::Unclosed(name)),
            None => Ok(Template(nodes)),
        }
    }

    /// Renders with `context` (an object).
    pub(crate) fn render(&self, context: &Value) -> String {
        let mut out = String::new();
        render(&self.0, &mut vec![context], &mut out);
        out
    }
}

fn lookup<'a>(scopes: &[&'a Value], name: &str) -> Option<&'a Value> {
    scopes.iter().rev().find_map(|s| s.get(name))
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null | Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

fn render<'a>(nodes: &'a [Node], scopes: &mut Vec<&'a Value>, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Value(name) => match lookup(scopes, name) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => out.push_str(s),
                Some(other) => out.push_str(&other.to_string()),
            },
            Node::Section { name, inverted, body } => {
                let value = lookup(scopes, name);
                if *inverted {
                    if !truthy(value) {
                        render(body, scopes, out);
                    }
                    continue;
                }
                match value {
                    Some(Value::Array(items)) => {
                        for item in items {
                            scopes.push(item);
                            render(body, scopes, out);
                            scopes.pop();
                        }
                    }
                    Some(v @ Value::Object(_)) => {
                        scopes.push(v);
                        render(body, scopes, out);
                        scopes.pop();
                    }
                    v if truthy(v) => render(body, scopes, out),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_sections_and_lists() {
        let t = Template::parse("{{title}}{{#more}} (and {{more}} more){{/more}}").unwrap();
        assert_eq!(t.render(&json!({"title": "Build", "more": 0})), "Build");
        assert_eq!(t.render(&json!({"title": "Build", "more": 4})), "Build (and 4 more)");
        let body = Template::parse(
            "{{unread}} unread for {{user}}:\n{{#notifications}}* {{title}}{{#body}}: {{body}}{{/body}} [{{user}}]\n{{/notifications}}{{^notifications}}none{{/notifications}}",
        )
        .unwrap();
        let ctx = json!({"user": "ann", "unread": 2, "notifications": [{"title": "a", "body": "x"}, {"title": "b", "body": null}]});
        assert_eq!(body.render(&ctx), "2 unread for ann:\n* a: x [ann]\n* b [ann]\n");
        assert_eq!(body.render(&json!({"user": "u", "unread": 0, "notifications": []})), "0 unread for u:\nnone");
    }

    #[test]
    fn missing_values_render_empty_and_other_json_as_text() {
        let t = Template::parse("[{{nope}}] {{ data }}").unwrap();
        assert_eq!(t.render(&json!({"data": {"k": [1]}})), "[] {\"k\":[1]}");
    }

    #[test]
    fn broken_templates_are_refused() {
        assert_eq!(Template::parse("{{#a}}x"), Err(TemplateError::Unclosed("a".into())));
        assert_eq!(Template::parse("{{#a}}x{{/b}}"), Err(TemplateError::Unexpected("b".into())));
        assert_eq!(Template::parse("x{{/a}}"), Err(TemplateError::Unexpected("a".into())));
        assert_eq!(Template::parse("{{title"), Err(TemplateError::Unterminated));
        assert_eq!(Template::parse("{{ }}"), Err(TemplateError::Empty));
        assert_eq!(Template::parse("plain }} text").unwrap().render(&json!({})), "plain }} text");
    }
}
