//! Wave analyses (a PromQL query that must hold while a wave soaks): the success condition and the Prometheus
//! HTTP API's instant-query result, parsed. The controller does the querying (`controller/src/analysis.rs`).

/// A comparison of each sample with a number: `result < 0.05`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    pub op: Op,
    pub threshold: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Condition {
    /// Parses `result <op> <number>`.
    pub fn parse(s: &str) -> Result<Condition, String> {
        let rest = s.trim().strip_prefix("result").ok_or_else(|| format!("{s:?} does not start with `result`"))?;
        let rest = rest.trim_start();
        let (op, number) =
            [("<=", Op::Le), (">=", Op::Ge), ("==", Op::Eq), ("!=", Op::Ne), ("<", Op::Lt), (">", Op::Gt)]
                .into_iter()
                .find_map(|(t, op)| rest.strip_prefix(t).map(|n| (op, n)))
                .ok_or_else(|| format!("{s:?}: expected one of < <= > >= == != after `result`"))?;
        let threshold: f64 =
            number.trim().parse().map_err(|_| format!("{s:?}: {:?} is not a number", number.trim()))?;
        if !threshold.is_finite() {
            return Err(format!("{s:?}: the number must be finite"));
        }
        Ok(Condition { op, threshold })
    }

    /// Whether `v` meets the condition (NaN never does).
    pub fn holds(&self, v: f64) -> bool {
        let t = self.threshold;
        match self.op {
            Op::Lt => v < t,
            Op::Le => v <= t,
            Op::Gt => v > t,
            Op::Ge => v >= t,
            Op::Eq => v == t,
            Op::Ne => !v.is_nan() && v != t,
        }
    }

    /// Whether every sample meets it; an empty result does not (no data is not health).
    pub fn judge(&self, samples: &[f64]) -> Result<(), String> {
        if samples.is_empty() {
            return Err("the query returned no data".into());
        }
        match samples.iter().find(|v| !self.holds(**v)) {
            Some(v) => Err(format!("{v} does not meet it")),
            None => Ok(()),
        }
    }
}

/// The sample values of a Prometheus `/api/v1/query` response (vector or scalar); its error as text.
pub fn samples(body: &serde_json::Value) -> Result<Vec<f64>, String> {
    if body["status"] != "success" {
        let what = body["error"].as_str().unwrap_or("an error without a message");
        return Err(format!("Prometheus answered: {what}"));
    }
    let value = |v: &serde_json::Value| -> Result<f64, String> {
        let s = v.get(1).and_then(|s| s.as_str()).ok_or_else(|| format!("a sample without a value: {v}"))?;
        s.parse::<f64>().map_err(|_| format!("a sample value that is not a number: {s:?}"))
    };
    let data = &body["data"];
    match data["resultType"].as_str() {
        Some("vector") => data["result"].as_array().into_iter().flatten().map(|r| value(&r["value"])).collect(),
        Some("scalar") => Ok(vec![value(&data["result"])?]),
        other => Err(format!("expected a vector or a scalar, got {other:?} (use an instant query)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_judge_every_sample() {
        let c = Condition::parse("result < 0.05").unwrap();
        assert_eq!(c, Condition { op: Op::Lt, threshold: 0.05 });
        assert!(c.judge(&[0.01, 0.049]).is_ok());
        assert!(c.judge(&[0.01, 0.05]).unwrap_err().contains("0.05"));
        assert!(c.judge(&[]).unwrap_err().contains("no data"));
        assert!(!c.holds(f64::NAN));
        for (s, v, ok) in [("result>=1", 1.0, true), (" result == 2 ", 2.0, true), ("result != 0", 0.0, false)] {
            assert_eq!(Condition::parse(s).unwrap().holds(v), ok, "{s} {v}");
        }
        for bad in ["x < 1", "result ~ 1", "result < abc", "result < inf", "result <"] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prometheus_results_are_read_as_samples() {
        let v = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"job": "a"}, "value": [1700000000.0, "0.25"]},
            {"metric": {"job": "b"}, "value": [1700000000.0, "NaN"]}]}});
        let got = samples(&v).unwrap();
        assert_eq!(got[0], 0.25);
        assert!(got[1].is_nan());
        let s = serde_json::json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}});
        assert_eq!(samples(&s).unwrap(), vec![3.0]);
        let e = serde_json::json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 4"});
        assert!(samples(&e).unwrap_err().contains("parse error"));
        let m = serde_json::json!({"status": "success", "data": {"resultType": "matrix", "result": []}});
        assert!(samples(&m).unwrap_err().contains("instant query"));
    }
}
