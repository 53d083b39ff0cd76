// Create/edit form: show the fields of the chosen source, and edit route templates with inputs
// instead of JSON. The JSON textarea stays the one thing submitted (the server validates it),
// so the form keeps working without this script and after a server-side error the editor is
// rebuilt from exactly what was sent.
(function () {
  "use strict";

  var TYPES = ["str", "int", "float", "bool", "list", "dict", "bytes"];
  // Which parameter types each constraint applies to (as in common/routes.py).
  var CONSTRAINTS = [
    { key: "ge", label: "≥ (ge)", types: ["int", "float"], kind: "number" },
    { key: "le", label: "≤ (le)", types: ["int", "float"], kind: "number" },
    { key: "choices", label: "Choices (comma separated)", types: ["str", "int", "float", "bool"], kind: "choices" },
    { key: "regex", label: "Regex", types: ["str"], kind: "text" },
    { key: "min_length", label: "Min length", types: ["str", "list", "bytes"], kind: "number" },
    { key: "max_length", label: "Max length", types: ["str", "list", "bytes"], kind: "number" }
  ];
  var ROUTE_KEYS = ["method", "path", "file", "function", "call", "params"];
  var PARAM_KEYS = ["name", "type", "required", "default"].concat(CONSTRAINTS.map(function (c) { return c.key; }));

  // ---- source choice: show the fields of the chosen kind (hidden inputs are still submitted) ----
  var sourceSelect = document.getElementById("source_kind");
  function showSource() {
    document.querySelectorAll("[data-source-group]").forEach(function (group) {
      group.hidden = group.dataset.sourceGroup !== sourceSelect.value;
    });
  }
  if (sourceSelect) {
    sourceSelect.addEventListener("change", showSource);
    showSource();
  }

  var textarea = document.getElementById("routes_json");
  var editor = document.getElementById("routes-editor");
  var jsonField = document.getElementById("routes-json-field");
  if (!textarea || !editor || !jsonField) return;
  var serverErrors = {};
  try { serverErrors = JSON.parse(editor.dataset.errors || "{}"); } catch (e) { serverErrors = {}; }

  // ---- small DOM helpers ----
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (name === "text") node.textContent = attrs[name];
      else node.setAttribute(name, attrs[name]);
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }
  function labelled(text, control, extraClass) {
    return el("label", { "class": "mini " + (extraClass || "") }, [el("span", { text: text }), control]);
  }
  function select(field, options, value) {
    var node = el("select", { "data-field": field });
    options.forEach(function (option) {
      var item = el("option", { value: option, text: option });
      if (option === value) item.selected = true;
      node.appendChild(item);
    });
    return node;
  }
  function textInput(field, value, placeholder) {
    var node = el("input", { type: "text", "data-field": field, placeholder: placeholder || "" });
    node.value = value === undefined || value === null ? "" : value;
    return node;
  }
  function shown(value) {  // a JSON value as the text of an input
    if (value === undefined || value === null) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }
  function extras(obj, managed) {  // keys the editor has no input for (e.g. description) survive
    var kept = {};
    Object.keys(obj || {}).forEach(function (key) { if (managed.indexOf(key) < 0) kept[key] = obj[key]; });
    return kept;
  }

  // ---- parsing input text back into JSON values; text that does not parse is sent as typed, so
  // the server's message names it and the user sees their input again ----
  function number(text) {
    var trimmed = text.trim();
    if (trimmed === "") return undefined;
    var value = Number(trimmed);
    return isFinite(value) ? value : trimmed;
  }
  function typed(kind, text) {
    if (kind === "str") return text;
    var trimmed = text.trim();
    if (kind === "bytes") return trimmed;
    if (kind === "int" || kind === "float") return number(trimmed);
    if (kind === "bool") return trimmed === "true" ? true : trimmed === "false" ? false : trimmed;
    try { return JSON.parse(trimmed); } catch (e) { return trimmed; }
  }

  // ---- building ----
  var list = el("div", { "class": "routes-list" });
  var empty = el("p", { "class": "muted", text: "No routes yet." });
  var addRoute = el("button", { type: "button", "class": "add-route", text: "+ Add route" });
  var toggle = el("button", { type: "button", "class": "small", text: "Edit as JSON" });
  editor.appendChild(list);
  editor.appendChild(empty);
  editor.appendChild(el("div", { "class": "editor-actions" }, [addRoute, toggle]));

  function constraintControl(spec, param) {
    var value = param[spec.key];
    var text = spec.kind === "choices" && Array.isArray(value) ? value.map(shown).join(", ") : shown(value);
    var wrap = labelled(spec.label, textInput(spec.key, text), "constraint");
    wrap.dataset.types = spec.types.join(" ");
    return wrap;
  }

  function showConstraints(paramNode) {
    var kind = paramNode.querySelector('[data-field="type"]').value;
    paramNode.querySelectorAll(".constraint").forEach(function (wrap) {
      var input = wrap.querySelector("input");
      // An inapplicable constraint that holds a value stays visible so its error can be seen.
      wrap.hidden = wrap.dataset.types.split(" ").indexOf(kind) < 0 && input.value.trim() === "";
    });
  }

  function paramNode(param) {
    var required = "required" in param ? !!param.required : !("default" in param);
    var requiredBox = el("input", { type: "checkbox", "data-field": "required" });
    requiredBox.checked = required;
    var node = el("div", { "class": "param" }, [
      el("div", { "class": "param-main" }, [
        labelled("Name", textInput("name", param.name, "e.g. text")),
        labelled("Type", select("type", TYPES, TYPES.indexOf(param.type) >= 0 ? param.type : "str")),
        el("label", { "class": "mini check" }, [requiredBox, el("span", { text: "required" })]),
        labelled("Default", textInput("default", shown(param["default"]), "none")),
        el("button", { type: "button", "class": "small remove-param", title: "Remove this parameter", text: "Remove" })
      ]),
      el("div", { "class": "param-constraints" }, CONSTRAINTS.map(function (spec) { return constraintControl(spec, param); }))
    ]);
    if (param.type !== undefined && TYPES.indexOf(param.type) < 0) {
      // An unknown type (e.g. from pasted JSON) is kept as an option so the error shows beside it.
      var typeSelect = node.querySelector('[data-field="type"]');
      typeSelect.appendChild(el("option", { value: String(param.type), text: String(param.type) }));
      typeSelect.value = String(param.type);
    }
    node.extras = extras(param, PARAM_KEYS);
    showConstraints(node);
    return node;
  }

  function routeNode(route) {
    var params = el("div", { "class": "params" });
    (Array.isArray(route.params) ? route.params : []).forEach(function (p) {
      params.appendChild(paramNode(p && typeof p === "object" ? p : {}));
    });
    var method = String(route.method || "POST").toUpperCase();
    var node = el("div", { "class": "route card" }, [
      el("div", { "class": "route-main" }, [
        labelled("Verb", select("method", ["POST", "GET"], method)),
        labelled("Path", textInput("path", route.path, "/predict"), "grow"),
        labelled("File", textInput("file", route.file, "predict.py"), "grow"),
        labelled("Function", textInput("function", route["function"], "predict"), "grow"),
        labelled("Call style", select("call", ["keyword", "positional"], route.call || "keyword")),
        el("button", { type: "button", "class": "small danger remove-route", title: "Remove this route", text: "Remove route" })
      ]),
      el("div", { "class": "params-head" }, [el("strong", { text: "Parameters" })]),
      params,
      el("button", { type: "button", "class": "small add-param", text: "+ Add parameter" })
    ]);
    node.extras = extras(route, ROUTE_KEYS);
    return node;
  }

  function build(routes) {
    list.textContent = "";
    routes.forEach(function (route) { list.appendChild(routeNode(route && typeof route === "object" ? route : {})); });
    refresh();
  }

  // ---- reading the inputs back ----
  function field(node, name) { return node.querySelector('[data-field="' + name + '"]'); }
  function own(node, selector) {  // direct children only: a route's inputs, not its params'
    return Array.prototype.filter.call(node.querySelectorAll(selector), function (n) {
      return n.closest(".route, .param") === node;
    });
  }

  function readParam(node) {
    var param = Object.assign({}, node.extras);
    var kind = field(node, "type").value;
    param.name = field(node, "name").value.trim();
    param.type = kind;
    param.required = field(node, "required").checked;
    var defaultText = field(node, "default").value;
    if (defaultText.trim() !== "") param["default"] = typed(kind, defaultText);
    CONSTRAINTS.forEach(function (spec) {
      var text = field(node, spec.key).value;
      if (text.trim() === "") return;
      if (spec.kind === "number") param[spec.key] = number(text);
      else if (spec.kind === "text") param[spec.key] = text;
      else param[spec.key] = text.split(",").map(function (part) { return part.trim(); })
        .filter(function (part) { return part !== ""; })
        .map(function (part) { return typed(kind, part); });
    });
    return param;
  }

  function readRoute(node) {
    var route = Object.assign({}, node.extras);
    ["method", "path", "file", "function", "call"].forEach(function (name) {
      route[name] = own(node, '[data-field="' + name + '"]')[0].value.trim();
    });
    route.params = Array.prototype.map.call(node.querySelectorAll(".param"), readParam);
    return route;
  }

  function serialize() {
    var routes = Array.prototype.map.call(list.querySelectorAll(".route"), readRoute);
    textarea.value = JSON.stringify(routes, null, 2);
  }

  // data-key names each input like the server's error keys: routes[0].params[1].type
  function refresh() {
    empty.hidden = list.querySelector(".route") !== null;
    list.querySelectorAll(".route").forEach(function (route, i) {
      var prefix = "routes[" + i + "]";
      route.dataset.key = prefix;
      ["method", "path", "file", "function", "call"].forEach(function (name) {
        own(route, '[data-field="' + name + '"]')[0].dataset.key = prefix + "." + name;
      });
      route.querySelector(".params").dataset.key = prefix + ".params";
      route.querySelectorAll(".param").forEach(function (param, j) {
        var paramPrefix = prefix + ".params[" + j + "]";
        param.dataset.key = paramPrefix;
        param.querySelectorAll("[data-field]").forEach(function (input) {
          input.dataset.key = paramPrefix + "." + input.dataset.field;
        });
      });
    });
  }

  // Server errors go beside their inputs once; they travel with the row if others are removed.
  function placeErrors() {
    var summary = document.getElementById("route-errors");
    Object.keys(serverErrors).forEach(function (key) {
      var target = key === "routes" ? editor : editor.querySelector('[data-key="' + key.replace(/"/g, "") + '"]');
      if (!target) return;
      var holder = target.matches("input, select") ? target.closest("label") : target;
      holder.classList.add("has-error");
      var message = el("div", { "class": "error", text: serverErrors[key] });
      if (holder === editor) editor.insertBefore(message, editor.firstChild);
      else if (holder.classList.contains("route") || holder.classList.contains("param")) holder.insertBefore(message, holder.firstChild);
      else holder.appendChild(message);
      var item = summary && summary.querySelector('[data-error-key="' + key.replace(/"/g, "") + '"]');
      if (item) item.remove();
    });
    if (summary && !summary.querySelector("li")) summary.hidden = true;
  }

  // ---- events ----
  addRoute.addEventListener("click", function () {
    var route = routeNode({ method: "POST", call: "keyword", params: [] });
    list.appendChild(route);
    refresh();
    serialize();
    route.querySelector('[data-field="path"]').focus();
  });
  editor.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("add-param")) {
      var param = paramNode({ type: "str", required: true });
      button.closest(".route").querySelector(".params").appendChild(param);
      param.querySelector('[data-field="name"]').focus();
    } else if (button.classList.contains("remove-param")) {
      button.closest(".param").remove();
    } else if (button.classList.contains("remove-route")) {
      button.closest(".route").remove();
    } else {
      return;
    }
    refresh();
    serialize();
  });
  editor.addEventListener("input", serialize);
  editor.addEventListener("change", function (event) {
    if (event.target.dataset.field === "type") showConstraints(event.target.closest(".param"));
    serialize();
  });
  textarea.form.addEventListener("submit", function () { if (!editor.hidden) serialize(); });

  function useEditor() {
    var text = textarea.value.trim();
    var routes;
    try { routes = text ? JSON.parse(text) : []; } catch (e) { routes = null; }
    // Not a list: the JSON textarea stays, with the user's text and the server's message.
    if (!Array.isArray(routes)) return false;
    build(routes);
    editor.hidden = false;
    jsonField.hidden = true;
    toggle.textContent = "Edit as JSON";
    return true;
  }

  toggle.addEventListener("click", function () {
    if (editor.hidden) return;
    serialize();
    editor.hidden = true;
    jsonField.hidden = false;
    jsonField.appendChild(backButton);
  });
  var backButton = el("button", { type: "button", "class": "small", text: "Use the routes editor" });
  backButton.addEventListener("click", function () {
    if (useEditor()) {
      backButton.remove();
      backNote.textContent = "";
    } else {
      backNote.textContent = "The text is not a JSON list of routes; fix it first.";
      jsonField.appendChild(backNote);
    }
  });
  var backNote = el("span", { "class": "error" });

  if (useEditor()) placeErrors();
  else jsonField.appendChild(backButton);
})();
