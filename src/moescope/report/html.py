"""Render a ReportContent as ONE self-contained HTML file (no network, PNGs inlined as base64).

Written by hand: no maintained library renders this kind of static, offline,
single-file report with an interactive token viewer, and the page is small.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from moescope.report.content import Figure, ReportContent, Section, Table

# Categorical palette (Tableau 20 order, darker first) for expert colours; cycles past 20.
EXPERT_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]

_CSS = """
:root { --fg:#1d232a; --muted:#5b6672; --line:#d9dee3; --bg:#ffffff; --panel:#f6f8fa; --accent:#2f6fab; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif; color:var(--fg); background:var(--bg); }
header { padding:28px 40px 18px; border-bottom:1px solid var(--line); background:var(--panel); }
header h1 { margin:0 0 4px; font-size:26px; }
header p { margin:0; color:var(--muted); }
nav { padding:8px 40px; border-bottom:1px solid var(--line); font-size:14px; position:sticky; top:0; background:#fff; z-index:5; }
nav a { color:var(--accent); margin-right:14px; text-decoration:none; }
main { padding:10px 40px 60px; max-width:1280px; }
section { margin-top:28px; }
h2 { font-size:20px; border-bottom:1px solid var(--line); padding-bottom:4px; }
.headline { background:#eef5fb; border-left:4px solid var(--accent); padding:12px 18px; margin-top:20px; }
.headline li { margin:4px 0; }
.figs { display:flex; flex-wrap:wrap; gap:18px; }
figure { margin:0; flex:1 1 440px; max-width:100%; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:4px; background:#fff; }
figcaption { color:var(--muted); font-size:13px; }
table.data { border-collapse:collapse; margin:8px 0 16px; font-size:13.5px; }
table.data th, table.data td { border:1px solid var(--line); padding:4px 9px; text-align:right; }
table.data th:first-child, table.data td:first-child { text-align:left; }
table.data th { background:var(--panel); }
.caption { color:var(--muted); font-size:13px; }
#viewer .controls { display:flex; gap:16px; align-items:center; flex-wrap:wrap; margin:8px 0; }
#viewer .legend-row { margin:2px 0; font-size:12px; }
#viewer .legend span { display:inline-block; padding:1px 7px; margin:2px; border-radius:3px; color:#fff; font-size:12px; }
.sample { border:1px solid var(--line); border-radius:6px; padding:10px 12px; margin:10px 0; }
.sample .meta { color:var(--muted); font-size:12px; margin-bottom:6px; }
.tokens { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; white-space:pre-wrap; word-break:break-word; line-height:1.9; }
.tok { border-radius:2px; padding:1px 0; cursor:default; box-shadow: inset -1px 0 0 rgba(255,255,255,.9); }
/* expert choice: a token no expert selected passes through the residual only */
.tok.unrouted { background:repeating-linear-gradient(135deg, #c9cfd5 0 3px, #f1f3f5 3px 6px); color:#5b6672; outline:1px dashed #9aa3ab; outline-offset:-1px; }
.tok.multi { box-shadow: inset -1px 0 0 rgba(255,255,255,.9), inset 0 -3px 0 #1d232a; }
#viewer .legend span.unrouted { color:#1d232a; background:repeating-linear-gradient(135deg, #c9cfd5 0 3px, #f1f3f5 3px 6px); outline:1px dashed #9aa3ab; }
#viewer .legend span.multi { color:#1d232a; background:#e9edf1; box-shadow: inset 0 -3px 0 #1d232a; }
#tip { position:fixed; pointer-events:none; white-space:pre; background:#1d232a; color:#fff; font-size:12px; padding:4px 8px; border-radius:4px; display:none; z-index:10; }
details.prov pre { background:var(--panel); padding:10px; overflow:auto; font-size:12px; }
"""

_VIEWER_JS = """
(function () {
  const data = JSON.parse(document.getElementById('viewer-data').textContent);
  const palette = JSON.parse(document.getElementById('viewer-palette').textContent);
  const armSel = document.getElementById('viewer-arm');
  const layerSel = document.getElementById('viewer-layer');
  const domSel = document.getElementById('viewer-domain');
  const modeSel = document.getElementById('viewer-colour');
  const out = document.getElementById('viewer-samples');
  const legend = document.getElementById('viewer-legend');
  const tip = document.getElementById('tip');
  const arms = Object.keys(data.arms || {});
  // Domain hues spread around the colour wheel; lightness cycles with the expert's rank
  // inside its domain group so that neighbouring experts of one domain differ.
  const LIGHT = [34, 46, 58, 70, 40, 52, 64];
  function hex2(x) { return Math.round(x * 255).toString(16).padStart(2, '0'); }
  function alpha(p) { return 0.35 + 0.65 * Math.max(0, Math.min(1, p)); }
  function decode(b64, wide) {
    const bin = atob(b64 || ''); const n = wide ? bin.length / 2 : bin.length; const outv = new Array(n);
    for (let i = 0; i < n; i++) outv[i] = wide ? (bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8)) : bin.charCodeAt(i);
    return outv;
  }
  let expertColour = {};  // expert id -> css colour (without alpha) for the current arm/layer/mode
  function layerColours(arm, layer) {
    const cols = {}; const mode = modeSel.value;
    const dom = (arm.expert_domain || {})[layer]; const share = (arm.expert_domain_share || {})[layer] || [];
    if (mode === 'expert' || !dom) {
      for (let e = 0; e < arm.n_experts; e++) cols[e] = {hex: palette[e % palette.length]};
      return cols;
    }
    const nd = arm.domains.length; const rank = {};
    for (let e = 0; e < arm.n_experts; e++) {
      const d = dom[e];
      if (d < 0) { cols[e] = {hsl: [0, 0, 75]}; continue; }
      rank[d] = (rank[d] || 0);
      // saturation: how strongly the expert belongs to its domain (1/D = not at all)
      const strength = nd > 1 ? Math.max(0, (share[e] - 1 / nd) / (1 - 1 / nd)) : 1;
      cols[e] = {hsl: [Math.round(360 * d / nd + 15) % 360, Math.round(20 + 70 * strength), LIGHT[rank[d] % LIGHT.length]]};
      rank[d] += 1;
    }
    return cols;
  }
  // expert choice: routed tokens shaded by how many experts took them (1 = palest)
  function takenColour(n, maxN) {
    const t = maxN > 1 ? (n - 1) / (maxN - 1) : 1;
    return 'hsl(210,' + Math.round(45 + 35 * t) + '%,' + Math.round(82 - 44 * t) + '%)';
  }
  function isExpertChoice(arm) { return arm.routing === 'expert_choice'; }
  function colour(e, p) {
    const c = expertColour[e];
    if (!c) return '';
    if (c.hex) return c.hex + hex2(alpha(p));
    return 'hsla(' + c.hsl[0] + ',' + c.hsl[1] + '%,' + c.hsl[2] + '%,' + alpha(p).toFixed(2) + ')';
  }
  function chip(text, bg) {
    const s = document.createElement('span'); s.style.background = bg; s.textContent = text; return s;
  }
  function fill(sel, values, label) {
    sel.innerHTML = '';
    values.forEach(v => { const o = document.createElement('option'); o.value = v; o.textContent = label(v); sel.appendChild(o); });
  }
  function chipClass(text, cls) {
    const s = document.createElement('span'); s.className = cls; s.textContent = text; return s;
  }
  function drawChoiceLegend(arm, layer, maxN) {
    // expert choice: what the hatching, the underline and the counts mean
    const row = document.createElement('div'); row.className = 'legend-row'; row.id = 'viewer-legend-choice';
    const head = document.createElement('b'); head.textContent = 'expert choice (experts pick tokens): '; row.appendChild(head);
    const share = (arm.unrouted_fraction || {})[layer];
    row.appendChild(chipClass('not routed', 'unrouted'));
    row.appendChild(document.createTextNode(' no expert selected the token, it passes through the residual only' +
      (share === undefined ? '' : ' (' + (100 * share).toFixed(1) + '% of held-out tokens in layer ' + layer + ')') + '; '));
    if (modeSel.value === 'taken') {
      for (let n = 1; n <= Math.max(1, maxN); n++) row.appendChild(chip(n + (n === 1 ? ' expert' : ' experts'), takenColour(n, maxN)));
      row.appendChild(document.createTextNode(' took the token.'));
    } else {
      row.appendChild(chipClass('underlined', 'multi'));
      row.appendChild(document.createTextNode(' taken by several experts (colour: the one with the highest router probability; hover for the count).'));
    }
    legend.appendChild(row);
  }
  function drawLegend(maxN) {
    const arm = data.arms[armSel.value]; const layer = layerSel.value;
    legend.innerHTML = '';
    if (isExpertChoice(arm)) drawChoiceLegend(arm, layer, maxN);
    if (modeSel.value === 'taken') return;
    if (modeSel.value === 'expert' || !(arm.expert_domain || {})[layer]) {
      for (let e = 0; e < arm.n_experts; e++) legend.appendChild(chip('expert ' + e, colour(e, 1)));
      return;
    }
    // per domain: its strongest experts in this layer (by P(domain | expert))
    const dom = arm.expert_domain[layer], share = arm.expert_domain_share[layer];
    arm.domains.forEach((name, d) => {
      const mine = []; for (let e = 0; e < arm.n_experts; e++) if (dom[e] === d) mine.push(e);
      mine.sort((a, b) => share[b] - share[a]);
      const row = document.createElement('div'); row.className = 'legend-row';
      const head = document.createElement('b'); head.textContent = name + ' (' + mine.length + ' experts): '; row.appendChild(head);
      mine.slice(0, 6).forEach(e => row.appendChild(chip('e' + e + ' ' + share[e].toFixed(2), colour(e, 1))));
      if (mine.length > 6) row.appendChild(document.createTextNode(' +' + (mine.length - 6)));
      legend.appendChild(row);
    });
  }
  function armChanged() {
    const arm = data.arms[armSel.value];
    fill(layerSel, arm.layers.map(String), v => 'layer ' + v);
    const doms = Array.from(new Set(arm.samples.map(s => s.domain)));
    fill(domSel, ['all'].concat(doms), v => v);
    const takenOpt = modeSel.querySelector('option[value="taken"]');
    if (isExpertChoice(arm) && !takenOpt) {
      const o = document.createElement('option'); o.value = 'taken'; o.textContent = 'number of experts that took the token'; modeSel.appendChild(o);
    } else if (!isExpertChoice(arm) && takenOpt) takenOpt.remove();
    modeSel.value = (arm.expert_domain && arm.n_experts > palette.length) ? 'domain' : 'expert';
    render();
  }
  function stepLayer(delta) {
    const i = Math.max(0, Math.min(layerSel.options.length - 1, layerSel.selectedIndex + delta));
    if (i !== layerSel.selectedIndex) { layerSel.selectedIndex = i; render(); }
  }
  function render() {
    const arm = data.arms[armSel.value];
    const layer = layerSel.value;
    const dom = domSel.value;
    const k = arm.top_k || 1, wide = arm.n_experts > 256;
    expertColour = layerColours(arm, layer);
    let maxN = 0;
    arm.samples.forEach(s => ((s.experts_per_token || {})[layer] || []).forEach(n => { if (n > maxN) maxN = n; }));
    drawLegend(maxN);
    out.innerHTML = '';
    arm.samples.forEach((s, i) => {
      if (dom !== 'all' && s.domain !== dom) return;
      const box = document.createElement('div'); box.className = 'sample';
      const meta = document.createElement('div'); meta.className = 'meta';
      meta.textContent = s.domain + ' \\u00b7 ' + (s.text_id || ('sample ' + i)) + ' \\u00b7 ' + s.tokens.length + ' tokens';
      const toks = document.createElement('div'); toks.className = 'tokens';
      const tk = (k > 1 && s.topk) ? decode(s.topk[layer], wide) : null;
      const tw = (k > 1 && s.topk_weights) ? decode(s.topk_weights[layer], false) : null;
      // top-k samples carry only the packed arrays: the first choice is each token's first entry
      const ex = tk ? s.tokens.map((_, j) => tk[j * k]) : ((s.experts || {})[layer] || []);
      const pr = tw ? s.tokens.map((_, j) => tw[j * k] / 255) : ((s.probs || {})[layer] || []);
      const taken = (s.experts_per_token || {})[layer];  // expert choice only: experts that took each token
      s.tokens.forEach((t, j) => {
        const sp = document.createElement('span'); sp.className = 'tok';
        sp.textContent = t;
        const e = ex[j], p = pr[j], n = taken ? taken[j] : undefined;
        if (e !== undefined && e >= 0) {
          if (n === 0) sp.classList.add('unrouted');  // its entry is only the router's first choice
          else if (modeSel.value === 'taken' && n !== undefined) sp.style.background = takenColour(n, maxN);
          else sp.style.background = colour(e, p === undefined ? 1 : p);
          if (n > 1 && modeSel.value !== 'taken') sp.classList.add('multi');
          sp.dataset.expert = e; sp.dataset.prob = (p === undefined ? NaN : p);
          if (n !== undefined) sp.dataset.taken = n;
          if (tk) {
            const parts = [];
            // expert choice: only the experts that took the token (at most k are stored)
            const shown = n === undefined ? k : Math.min(k, n);
            for (let r = 0; r < shown; r++) parts.push(tk[j * k + r] + ':' + (tw[j * k + r] / 255).toFixed(2));
            sp.dataset.topk = parts.join(' ');
          }
        }
        toks.appendChild(sp);
      });
      box.appendChild(meta); box.appendChild(toks); out.appendChild(box);
    });
  }
  function showTip(ev) {
    const t = ev.target;
    if (!t.classList || !t.classList.contains('tok') || t.dataset.expert === undefined) { tip.style.display = 'none'; return; }
    const arm = data.arms[armSel.value];
    const dom = (arm.expert_domain || {})[layerSel.value];
    let text = 'layer ' + layerSel.value + ' \\u00b7 ' + JSON.stringify(t.textContent);
    const n = t.dataset.taken === undefined ? undefined : Number(t.dataset.taken);
    if (n === 0) {
      text += '\\nnot routed (expert choice: no expert selected this token)';
      text += '\\nits router preferred expert ' + t.dataset.expert + ' (p = ' + Number(t.dataset.prob).toFixed(3) + '); the token passes through the residual only';
      if (arm.n_shared_experts) text += '\\n  + ' + arm.n_shared_experts + ' shared expert(s), always active';
    } else if (t.dataset.topk) {
      text += n === undefined ? '\\ntop-' + arm.top_k + ' experts (gate weight):'
        : '\\ntaken by ' + n + ' expert' + (n === 1 ? '' : 's') + ' (expert choice)' +
          (n > arm.top_k ? '; the ' + arm.top_k + ' with the highest router probability (gate weight):' : ' (gate weight):');
      t.dataset.topk.split(' ').forEach(pair => {
        const [e, w] = pair.split(':');
        text += '\\n  expert ' + e + '  ' + w + (dom && dom[e] >= 0 ? '  (' + arm.domains[dom[e]] + ')' : '');
      });
      if (arm.n_shared_experts) text += '\\n  + ' + arm.n_shared_experts + ' shared expert(s), always active';
    } else {
      text += ' \\u00b7 expert ' + t.dataset.expert + ' \\u00b7 p = ' + Number(t.dataset.prob).toFixed(3);
      if (n !== undefined) text += '\\ntaken by ' + n + ' expert' + (n === 1 ? '' : 's') + ' (expert choice)' +
        (n > 1 ? '; colour and p: the one with the highest router probability' : '');
    }
    tip.textContent = text;
    tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; tip.style.display = 'block';
  }
  out.addEventListener('mouseover', showTip);
  out.addEventListener('mousemove', showTip);
  out.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  fill(armSel, arms, v => v);
  armSel.addEventListener('change', armChanged);
  layerSel.addEventListener('change', render);
  domSel.addEventListener('change', render);
  modeSel.addEventListener('change', render);
  document.getElementById('viewer-prev').addEventListener('click', () => stepLayer(-1));
  document.getElementById('viewer-next').addEventListener('click', () => stepLayer(1));
  if (arms.length) armChanged();
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# Characters that must never appear raw in JSON embedded in HTML: "<" and ">" could open
# "</script>" or "<!--" (which makes the parser swallow the rest of the page), "&" an
# entity, and U+2028/U+2029 end a line in older JavaScript. JSON's \uXXXX escapes keep the
# parsed value identical.
_SCRIPT_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_JSON_UNSAFE = re.compile("[<>&\u2028\u2029]")


def json_for_script(obj: Any) -> str:
    """JSON text safe inside <script type="application/json">: JSON.parse gives back ``obj``."""
    text = json.dumps(obj, ensure_ascii=False)
    return _SCRIPT_JSON_UNSAFE.sub(lambda m: _SCRIPT_JSON_ESCAPES[m.group(0)], text)


def _slug(text: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-")


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.png_path).read_bytes()).decode("ascii")
    cap = f"<figcaption><b>{_esc(fig.title)}</b>{'. ' + _esc(fig.caption) if fig.caption else ''}</figcaption>"
    return f'<figure><img alt="{_esc(fig.title)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_format_cell(v))}</td>" for v in row) + "</tr>" for row in table.rows)
    cap = f'<div class="caption">{_esc(table.caption)}</div>' if table.caption else ""
    return f"<h3>{_esc(table.title)}</h3><table class=\"data\"><tr>{head}</tr>{body}</table>{cap}"


def _section_html(sec: Section) -> str:
    parts = [f'<section id="{_esc(sec.anchor or _slug(sec.heading))}"><h2>{_esc(sec.heading)}</h2>']
    parts += [f"<p>{_esc(p)}</p>" for p in sec.paragraphs]
    parts += [_table_html(t) for t in sec.tables]
    if sec.figures:
        parts.append('<div class="figs">' + "".join(_figure_html(f) for f in sec.figures) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _expert_choice_note(viewer: dict[str, Any]) -> str:
    """What the viewer shows for expert-choice arms (experts pick tokens), when the report has one."""
    arms = [name for name, arm in viewer.get("arms", {}).items() if arm.get("routing") == "expert_choice"]
    if not arms:
        return ""
    return (f'\n<p id="viewer-expert-choice">Expert choice ({_esc(", ".join(arms))}): each expert picks its tokens, so '
            "a token may be taken by several experts or by none. A token no expert selected is hatched grey: it "
            "passes through the residual only, and its hover text names the expert its router preferred. A token "
            "taken by several experts is underlined; colour by 'number of experts that took the token' to see the "
            "counts, which the hover text also gives.</p>")


def _viewer_html(viewer: dict[str, Any]) -> str:
    return f"""
<section id="viewer"><h2>Per-token routing viewer</h2>
<p>Held-out texts from each domain, every token coloured by the expert its router chose
first in the selected layer; paler means a less confident router. With many experts the
colour is the expert's dominant domain (the domain that relies on it most; greyer = less
tied to one domain), shaded by expert. Hover a token for its experts and their weights.</p>{_expert_choice_note(viewer)}
<div class="controls">
 <label>arm <select id="viewer-arm"></select></label>
 <label>layer <button type="button" id="viewer-prev" title="previous layer">&#9664;</button><select id="viewer-layer"></select><button type="button" id="viewer-next" title="next layer">&#9654;</button></label>
 <label>domain <select id="viewer-domain"></select></label>
 <label>colour by <select id="viewer-colour"><option value="expert">expert</option><option value="domain">expert's dominant domain</option></select></label>
</div>
<div class="legend" id="viewer-legend"></div>
<div id="viewer-samples"></div>
<div id="tip"></div>
<script type="application/json" id="viewer-data">{json_for_script(viewer)}</script>
<script type="application/json" id="viewer-palette">{json_for_script(EXPERT_PALETTE)}</script>
<script>{_VIEWER_JS}</script>
</section>"""


def render_html(content: ReportContent) -> str:
    nav = ['<a href="#headline">Headline</a>']
    nav += [f'<a href="#{_esc(s.anchor or _slug(s.heading))}">{_esc(s.heading)}</a>' for s in content.sections]
    if content.viewer:
        nav.append('<a href="#viewer">Token viewer</a>')
    headline = "".join(f"<li>{_esc(h)}</li>" for h in content.headline)
    body = [
        f'<section id="headline" class="headline"><b>What this run shows</b><ul>{headline}</ul></section>',
        *(_section_html(s) for s in content.sections),
    ]
    if content.viewer:
        body.append(_viewer_html(content.viewer))
    if content.provenance:
        prov = _esc(json.dumps(content.provenance, indent=2, default=str))
        body.append(f'<section><details class="prov"><summary>Provenance (config, seeds, versions, data)</summary><pre>{prov}</pre></details></section>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(content.title)}</title><style>{_CSS}</style></head>
<body><header><h1>{_esc(content.title)}</h1><p>{_esc(content.subtitle)}</p></header>
<nav>{''.join(nav)}</nav>
<main>{''.join(body)}</main></body></html>
"""


def _md_cell(value: Any) -> str:
    """A table cell that stays one cell: a token such as '|' or a newline must not end it."""
    return " ".join(_format_cell(value).replace("|", "\\|").split("\n"))


def render_markdown(content: ReportContent, figure_dir: str = "figures") -> str:
    lines = [f"# {content.title}", "", content.subtitle, "", "## What this run shows", ""]
    lines += [f"- {h}" for h in content.headline]
    for sec in content.sections:
        lines += ["", f"## {sec.heading}", ""]
        lines += [p + "\n" for p in sec.paragraphs]
        for t in sec.tables:
            lines += [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in t.rows]
            if t.caption:
                lines += ["", f"_{t.caption}_"]
            lines.append("")
        for f in sec.figures:
            lines.append(f"![{f.title}]({figure_dir}/{Path(f.png_path).name})")
    return "\n".join(lines) + "\n"
