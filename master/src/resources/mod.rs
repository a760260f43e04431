//! Shared resources (SPEC S7): named values held by the master, of the
//! seed's eight types, read and written by task code under read/write locks
//! ([`locks`]). This module owns the types and their checks.

pub mod locks;

use serde_json::Value;

pub use crate::manifest::ResourceType;

impl ResourceType {
    pub fn name(self) -> &'static str {
        match self {
            ResourceType::File => "File",
            ResourceType::String => "String",
            ResourceType::Integer => "Integer",
            ResourceType::Float => "Float",
            ResourceType::Boolean => "Boolean",
            ResourceType::List => "List",
            ResourceType::Dictionary => "Dictionary",
            ResourceType::Tuple => "Tuple",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, String> {
        let all = [
            ResourceType::File,
            ResourceType::String,
            ResourceType::Integer,
            ResourceType::Float,
            ResourceType::Boolean,
            ResourceType::List,
            ResourceType::Dictionary,
            ResourceType::Tuple,
        ];
        all.into_iter().find(|t| t.name() == raw).ok_or_else(|| {
            format!("unknown resource type `{raw}`: expected one of File, String, Integer, Float, Boolean, List, Dictionary, Tuple")
        })
    }

    /// The value a resource of this type starts with when none is given.
    pub fn zero(self) -> Value {
        match self {
            ResourceType::File | ResourceType::String => Value::String(String::new()),
            ResourceType::Integer => Value::from(0),
            ResourceType::Float => Value::from(0.0),
            ResourceType::Boolean => Value::Bool(false),
            ResourceType::List | ResourceType::Tuple => Value::Array(Vec::new()),
            ResourceType::Dictionary => Value::Object(Default::default()),
        }
    }

    /// Checks (and normalises) a value for this type: an `Integer` holds a
    /// whole number, a `Float` any number, a `File` its text content...
    pub fn check(self, value: Value) -> Result<Value, String> {
        let ok = match (self, &value) {
            (ResourceType::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (ResourceType::Float, Value::Number(_)) => true,
            (ResourceType::Boolean, Value::Bool(_)) => true,
            (ResourceType::String | ResourceType::File, Value::String(_)) => true,
            (ResourceType::List | ResourceType::Tuple, Value::Array(_)) => true,
            (ResourceType::Dictionary, Value::Object(_)) => true,
            _ => false,
        };
        if ok {
            Ok(value)
        } else {
            Err(format!(
                "a {} resource cannot hold {}",
                self.name(),
                describe(&value)
            ))
        }
    }
}

/// `the string "x"`, `the number 1.5`... for error messages.
pub fn describe(v: &Value) -> String {
    let text = v.to_string();
    let short = if text.len() > 60 {
        format!("{}...", &text[..text.floor_char_boundary(60)])
    } else {
        text
    };
    let kind = match v {
        Value::Null => return "null (no value)".into(),
        Value::Bool(_) => "the boolean",
        Value::Number(n) if n.is_f64() => "the float",
        Value::Number(_) => "the integer",
        Value::String(_) => "the string",
        Value::Array(_) => "the list",
        Value::Object(_) => "the dictionary",
    };
    format!("{kind} {short}")
}

/// The value a resource starts with: `initial_value`, or for a `File` with a
/// `path`, the file's content (read now; the master keeps it from then on).
pub fn initial_value(spec: &crate::manifest::ResourceSpec) -> Result<Value, String> {
    match (&spec.path, spec.kind) {
        (Some(path), ResourceType::File) => {
            if !spec.initial_value.is_null() {
                return Err(format!(
                    "File resource `{}`: give either values.path or values.initial_value, not both",
                    spec.name
                ));
            }
            std::fs::read_to_string(path)
                .map(Value::String)
                .map_err(|e| format!("File resource `{}`: cannot read {path}: {e}", spec.name))
        }
        (Some(_), other) => Err(format!(
            "resource `{}`: values.path is only for File resources, not {}",
            spec.name,
            other.name()
        )),
        (None, _) => Ok(spec.initial_value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_against_their_type() {
        assert!(ResourceType::Integer.check(json!(3)).is_ok());
        let err = ResourceType::Integer.check(json!("3")).unwrap_err();
        assert!(err.contains("Integer") && err.contains("string"), "{err}");
        assert!(ResourceType::Integer.check(json!(1.5)).is_err());
        assert!(ResourceType::Float.check(json!(1)).is_ok());
        assert!(ResourceType::Tuple.check(json!([1, 2])).is_ok());
        assert!(ResourceType::Dictionary.check(json!([])).is_err());
        assert!(ResourceType::Boolean.check(json!(0)).is_err());
        assert!(ResourceType::parse("Integr")
            .unwrap_err()
            .contains("Integr"));
    }
}
