// Small line charts as inline SVG, drawn here: no chart library. Colours come from CSS classes
// (the page's Content-Security-Policy allows no inline style).

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

/**
 * A line chart. series: [{values: [number|null], className, connect}] over shared x positions
 * (xs, or 0..n-1). label: what a screen reader hears; format: how the top value is written.
 */
export function lineChart(series, { label, xs = null, width = 220, height = 64, format = String } = {}) {
  const length = Math.max(0, ...series.map((s) => s.values.length));
  const positions = xs || Array.from({ length }, (_, i) => i);
  const finite = series.flatMap((s) => s.values.filter((v) => v !== null && Number.isFinite(v)));
  const top = niceMax(Math.max(0, ...finite));
  const xMin = positions.length ? Math.min(...positions) : 0;
  const xMax = positions.length ? Math.max(...positions) : 1;
  const pad = { left: 4, right: 4, top: 12, bottom: 4 };
  const plotWidth = width - pad.left - pad.right;
  const plotHeight = height - pad.top - pad.bottom;
  const x = (value) => pad.left + (xMax === xMin ? plotWidth / 2 : ((value - xMin) / (xMax - xMin)) * plotWidth);
  const y = (value) => pad.top + plotHeight - (value / top) * plotHeight;

  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart" });
  chart.setAttribute("aria-label", label);
  const title = svg("title");
  title.textContent = label;
  chart.append(title);
  chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0), class: "axis" }));
  chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(top), y2: y(top), class: "grid" }));
  const topLabel = svg("text", { x: width - pad.right, y: pad.top - 3, class: "tick", "text-anchor": "end" });
  topLabel.textContent = format(top);
  chart.append(topLabel);

  for (const { values, className, connect = false } of series) {
    let path = "";
    let drawing = false;
    values.forEach((value, index) => {
      if (value === null || !Number.isFinite(value)) {
        drawing = drawing && connect; // a sparse series (validation loss) joins its points
        return;
      }
      path += `${drawing ? "L" : "M"}${x(positions[index]).toFixed(1)},${y(value).toFixed(1)}`;
      drawing = true;
    });
    if (path) chart.append(svg("path", { d: path, class: `line ${className || ""}` }));
    // A lone point between gaps draws no line: mark every point that has no neighbour.
    values.forEach((value, index) => {
      const alone = !connect && value !== null && Number.isFinite(value) && !Number.isFinite(values[index - 1] ?? NaN) && !Number.isFinite(values[index + 1] ?? NaN);
      if (alone) chart.append(svg("circle", { cx: x(positions[index]), cy: y(value), r: 2, class: `dot ${className || ""}` }));
    });
  }
  return chart;
}
