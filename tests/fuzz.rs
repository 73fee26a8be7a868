//! Property tests (proptest) of the code that judges untrusted input: response validation
//! against an output schema, and the parsing of provider responses.
//!
//! Each property compares sluice with an independent reference written here from the JSON
//! Schema rules (over the raw JSON of the schema, not sluice's typed tree): a value is accepted
//! by sluice exactly when the reference accepts it, and a response becomes a value exactly when
//! its content is that value (or `{"value": ...}` around it) and the reference accepts it.
//! Values are drawn near each schema's bounds, so both answers occur often.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use sluice::llm::parse_response;
use sluice::types::{ErrorKind, LlmResponse, OutputSchema};

/// Arbitrary JSON values, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arbitrary schemas of the supported subset (and, sometimes, unsupported keywords).
fn any_schema() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "string", "minLength": 1, "maxLength": 3})),
        Just(json!({"type": "integer", "minimum": 0})),
        Just(json!({"type": "integer", "minimum": -1, "maximum": 1})),
        Just(json!({"type": "number", "maximum": 0.5})),
        Just(json!({"type": "number", "enum": [1, 2.5]})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": ["string", "null"]})),
        Just(json!({"type": ["null", "integer"]})),
        Just(json!({"type": "string", "enum": ["a", "b"]})),
        Just(json!({"type": "string", "pattern": "x"})),
    ];
    scalar.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            (inner.clone(), 0u64..3, 0u64..3).prop_map(|(items, min, extra)| json!({
                "type": "array", "items": items, "minItems": min, "maxItems": min + extra
            })),
            (
                prop::collection::btree_map("[a-c]", inner, 1..3),
                any::<bool>()
            )
                .prop_map(|(props, closed)| {
                    let required: Vec<&String> = props.keys().take(1).collect();
                    json!({"type": "object", "properties": props, "required": required,
                           "additionalProperties": !closed})
                }),
        ]
    })
}

/// Values shaped like `schema` but drawn around its bounds: right type or not, lengths and
/// numbers on both sides of each limit, properties missing or extra.
fn near(schema: &Value) -> BoxedStrategy<Value> {
    let ty = match &schema["type"] {
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null")
            .to_string(),
        t => t.as_str().unwrap_or("null").to_string(),
    };
    let other = any_json().boxed();
    let shaped = match ty.as_str() {
        "string" => "[ab]{0,4}".prop_map(Value::String).boxed(),
        "integer" => prop_oneof![(-3i64..4).prop_map(|i| json!(i)), Just(json!(2.0))].boxed(),
        "number" => prop_oneof![
            (-3i64..4).prop_map(|i| json!(i)),
            Just(json!(2.5)),
            Just(json!(0.5))
        ]
        .boxed(),
        "boolean" => any::<bool>().prop_map(Value::Bool).boxed(),
        "array" => prop::collection::vec(near(&schema["items"]), 0..5)
            .prop_map(Value::Array)
            .boxed(),
        "object" => {
            let props: Vec<(String, Value)> = schema["properties"]
                .as_object()
                .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = props
                .iter()
                .map(|(k, s)| {
                    let k = k.clone();
                    prop::option::weighted(0.85, near(s))
                        .prop_map(move |v| v.map(|v| (k.clone(), v)))
                        .boxed()
                })
                .collect();
            (fields, prop::option::weighted(0.2, any_json()))
                .prop_map(|(fields, extra)| {
                    let mut m: Map<String, Value> = fields.into_iter().flatten().collect();
                    if let Some(x) = extra {
                        m.insert("zz".into(), x);
                    }
                    Value::Object(m)
                })
                .boxed()
        }
        _ => other.clone(),
    };
    prop_oneof![8 => shaped, 1 => Just(Value::Null), 1 => other].boxed()
}

fn schema_and_value() -> impl Strategy<Value = (Value, Value)> {
    any_schema().prop_flat_map(|s| {
        let v = near(&s);
        (Just(s), v)
    })
}

/// The reference: whether `v` satisfies `s` by the JSON Schema rules of the supported subset.
fn reference_accepts(s: &Value, v: &Value) -> bool {
    let (ty, nullable) = match &s["type"] {
        Value::String(t) => (t.as_str(), false),
        Value::Array(ts) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            let t = names
                .iter()
                .copied()
                .find(|t| *t != "null")
                .unwrap_or("null");
            (t, names.contains(&"null"))
        }
        _ => return false,
    };
    if v.is_null() {
        return nullable;
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let count = |k: &str| s.get(k).and_then(Value::as_u64);
    let in_enum = |v: &Value| match s.get("enum").and_then(Value::as_array) {
        None => true,
        Some(e) => e
            .iter()
            .any(|x| x == v || (x.is_number() && x.as_f64() == v.as_f64())),
    };
    let in_range =
        |f: f64| num("minimum").is_none_or(|lo| f >= lo) && num("maximum").is_none_or(|hi| f <= hi);
    match (ty, v) {
        ("string", Value::String(st)) => {
            let n = st.chars().count() as u64;
            in_enum(v)
                && count("minLength").is_none_or(|lo| n >= lo)
                && count("maxLength").is_none_or(|hi| n <= hi)
        }
        ("integer", Value::Number(n)) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            f.fract() == 0.0 && in_enum(v) && in_range(f)
        }
        ("number", Value::Number(n)) => in_enum(v) && in_range(n.as_f64().unwrap_or(f64::NAN)),
        ("boolean", Value::Bool(_)) => true,
        ("array", Value::Array(items)) => {
            let n = items.len() as u64;
            count("minItems").is_none_or(|lo| n >= lo)
                && count("maxItems").is_none_or(|hi| n <= hi)
                && items.iter().all(|i| reference_accepts(&s["items"], i))
        }
        ("object", Value::Object(m)) => {
            let props = s["properties"].as_object();
            let required = s["required"].as_array().cloned().unwrap_or_default();
            let closed = s["additionalProperties"] == Value::Bool(false);
            required
                .iter()
                .filter_map(Value::as_str)
                .all(|r| m.contains_key(r))
                && m.iter().all(|(k, val)| match props.and_then(|p| p.get(k)) {
                    Some(sub) => reference_accepts(sub, val),
                    None => !closed,
                })
        }
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn validation_accepts_exactly_what_the_reference_accepts(
        (schema, value) in schema_and_value(),
    ) {
        let Ok(s) = OutputSchema::new(schema.clone()) else { return Ok(()); };
        let ours = s.validate(&value);
        prop_assert_eq!(
            ours.is_ok(),
            reference_accepts(&schema, &value),
            "schema {} value {} ({:?})", schema, value, ours
        );
        // What validates converts to the declared Arrow type.
        if ours.is_ok() {
            let array = s.to_array(&[Some(&value), None]);
            prop_assert!(array.is_ok(), "validated value must convert: {:?}", array.err());
            let array = array.unwrap();
            prop_assert_eq!(array.data_type(), &s.data_type);
        }
    }

    #[test]
    fn a_response_is_a_value_exactly_when_its_content_is_a_valid_one(
        (schema, value) in schema_and_value(),
        wrap in any::<bool>(),
        finish in prop_oneof![Just("stop"), Just("length"), Just("content_filter")],
    ) {
        let Ok(s) = OutputSchema::new(schema.clone()) else { return Ok(()); };
        let sent = if wrap { json!({ "value": value }) } else { value.clone() };
        let resp = LlmResponse {
            confidence: None,
            content: sent.to_string(),
            finish_reason: Some(finish.to_string()),
            usage: None,
            rate: Default::default(),
        };
        // The value the content's text denotes (a float need not survive printing exactly),
        // `{"value": x}` unwrapped for schemas whose root is not an object.
        let sent: Value = serde_json::from_str(&resp.content).expect("printed JSON parses");
        let meant = match &sent {
            Value::Object(m) if s.is_wrapped() && m.len() == 1 && m.contains_key("value") => {
                m["value"].clone()
            }
            other => other.clone(),
        };
        let expected = finish != "length" && reference_accepts(&schema, &meant);
        match parse_response(Some(&s), &resp) {
            Ok(v) => {
                prop_assert!(expected, "accepted {} for schema {}", sent, schema);
                prop_assert_eq!(v, meant);
            }
            Err(e) => {
                prop_assert!(!expected, "refused {} for schema {}: {:?}", sent, schema, e);
                let kind = if finish == "length" {
                    ErrorKind::Truncated
                } else {
                    ErrorKind::InvalidOutput
                };
                prop_assert_eq!(e.kind, kind);
            }
        }
    }

    #[test]
    fn response_parsing_never_panics_on_any_text(
        schema in any_schema(),
        content in ".{0,40}",
    ) {
        let Ok(s) = OutputSchema::new(schema) else { return Ok(()); };
        let resp = LlmResponse {
            confidence: None,
            content,
            finish_reason: Some("stop".into()),
            usage: None,
            rate: Default::default(),
        };
        if let Ok(v) = parse_response(Some(&s), &resp) {
            prop_assert!(s.validate(&v).is_ok(), "accepted an invalid value {}", v);
        }
    }
}
