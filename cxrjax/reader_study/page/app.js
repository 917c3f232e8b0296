// The reader's page. The server holds the truth: the order, the answers saved so far and where to
// resume; this page only keeps the answer being given until the server confirms it is on disk.
'use strict';

const CLASS_KEYS = 'ABCDEFGHIJKLMNOPQTUVWXYZ'; // R and S answer real / synthetic
const $ = (id) => document.getElementById(id);

let state = null; // from /api/state
let idx = 0; // position in state.order
let draft = {}; // {call, realism, class} for the image shown
let shownAt = 0;
let saving = false;

function frontier() {
  // The first image without an answer: a reader may go back, and forward up to here.
  for (let i = 0; i < state.order.length; i++) if (!(state.order[i] in state.answers)) return i;
  return state.order.length;
}

function answeredCount() {
  return Object.keys(state.answers).length;
}

function complete(d) {
  return Boolean(d.call && d.realism && (!state.ask_class || d.class));
}

function setStatus(text, kind) {
  const s = $('status');
  s.textContent = text;
  s.className = kind || '';
}

function buildControls() {
  const realism = $('realism');
  for (let r = 1; r <= 5; r++) {
    const b = document.createElement('button');
    b.type = 'button';
    b.dataset.realism = String(r);
    b.innerHTML = `<kbd>${r}</kbd> `;
    b.appendChild(document.createTextNode(state.realism_labels[String(r)]));
    b.addEventListener('click', () => choose('realism', r));
    realism.appendChild(b);
  }
  if (state.ask_class) {
    $('class-question').hidden = false;
    $('intro-class').hidden = false;
    state.classes.forEach((name, i) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.class = name;
      b.innerHTML = i < CLASS_KEYS.length ? `<kbd>${CLASS_KEYS[i]}</kbd> ` : '';
      b.appendChild(document.createTextNode(name));
      b.addEventListener('click', () => choose('class', name));
      $('classes').appendChild(b);
    });
  }
  document.querySelectorAll('#calls button').forEach((b) => b.addEventListener('click', () => choose('call', b.dataset.call)));
  $('save').addEventListener('click', save);
  $('prev').addEventListener('click', () => go(idx - 1));
  $('next').addEventListener('click', () => go(idx + 1));
  $('start').addEventListener('click', startStudy);
  $('intro-n').textContent = String(state.n);
}

function render() {
  const n = state.order.length;
  const done = answeredCount();
  $('answered').textContent = `${done} of ${n} answered`;
  $('bar-fill').style.width = `${(100 * done) / n}%`;
  document.body.dataset.answered = String(done);
  if (idx >= n) {
    $('done').hidden = false;
    $('position').textContent = '';
    document.body.dataset.index = String(n);
    return;
  }
  $('done').hidden = true;
  const token = state.order[idx];
  $('position').textContent = `Image ${idx + 1} of ${n}`;
  const img = $('image');
  if (img.dataset.token !== token) {
    img.dataset.token = token;
    shownAt = 0;
    img.onload = () => {
      shownAt = performance.now();
    };
    img.src = `/images/${token}.png`;
    if (idx + 1 < n) new Image().src = `/images/${state.order[idx + 1]}.png`; // preload the next one
  }
  document.querySelectorAll('#calls button').forEach((b) => b.classList.toggle('selected', b.dataset.call === draft.call));
  document.querySelectorAll('#realism button').forEach((b) =>
    b.classList.toggle('selected', Number(b.dataset.realism) === draft.realism));
  document.querySelectorAll('#classes button').forEach((b) => b.classList.toggle('selected', b.dataset.class === draft.class));
  $('save').disabled = !complete(draft) || saving;
  $('prev').disabled = idx === 0;
  $('next').disabled = idx >= frontier();
  document.body.dataset.index = String(idx);
}

function go(i) {
  if (!state || saving) return;
  const n = state.order.length;
  if (i < 0 || i > Math.min(frontier(), n)) return;
  idx = i;
  const saved = idx < n ? state.answers[state.order[idx]] : null;
  draft = saved ? { call: saved.call, realism: saved.realism, class: saved.class } : {};
  render();
}

function choose(field, value) {
  if (!state || idx >= state.order.length || !$('intro').hidden) return;
  draft[field] = value;
  setStatus('');
  render();
}

async function save() {
  if (!state || saving || idx >= state.order.length) return;
  if (!complete(draft)) {
    setStatus(state.ask_class ? 'answer all three questions' : 'answer both questions', 'error');
    return;
  }
  const token = state.order[idx];
  const body = { token, call: draft.call, realism: draft.realism, class: state.ask_class ? draft.class : null };
  body.seconds = shownAt ? Math.round(performance.now() - shownAt) / 1000 : null;
  saving = true;
  setStatus('saving...');
  render();
  try {
    const r = await fetch('/api/answer', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    const reply = await r.json();
    if (!r.ok) throw new Error(reply.error || `HTTP ${r.status}`);
    state.answers[token] = { call: body.call, realism: body.realism, class: body.class };
    saving = false;
    setStatus('saved \u2713', 'ok');
    go(frontier());
  } catch (e) {
    saving = false;
    // Nothing is lost: the answer stays on screen until the server has it.
    setStatus('NOT SAVED: is the server running? Press Enter to retry', 'error');
    render();
  }
}

function startStudy() {
  $('intro').hidden = true;
  render();
}

function onKey(e) {
  if (!state || e.ctrlKey || e.metaKey || e.altKey) return;
  const key = e.key;
  if (!$('intro').hidden) {
    if (key === 'Enter' || key === 'Escape' || key === '?') {
      e.preventDefault();
      startStudy();
    }
    return;
  }
  if (key === '?') {
    $('intro').hidden = false;
    return;
  }
  if (key === 'ArrowLeft') return go(idx - 1);
  if (key === 'ArrowRight') return go(idx + 1);
  if (idx >= state.order.length) return;
  if (key === 'Enter') {
    e.preventDefault(); // not a click on the focused button as well
    return save();
  }
  const k = key.toUpperCase();
  if (k === 'R') return choose('call', 'real');
  if (k === 'S') return choose('call', 'synthetic');
  if (key >= '1' && key <= '5') return choose('realism', Number(key));
  const c = CLASS_KEYS.indexOf(k);
  if (state.ask_class && k.length === 1 && c >= 0 && c < state.classes.length) choose('class', state.classes[c]);
}

async function load() {
  try {
    const r = await fetch('/api/state');
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    state = await r.json();
  } catch (e) {
    setStatus('cannot reach the server: start it again and reload this page', 'error');
    return;
  }
  $('title').textContent = `Reader study \u2014 ${state.reader}`;
  buildControls();
  document.addEventListener('keydown', onKey);
  go(state.next);
  if (answeredCount() === 0) $('intro').hidden = false;
  document.body.dataset.ready = '1';
}

load();
