// The one way the page makes an element: a tag, its classes, and text set as text (never parsed as HTML).

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
